"""The embedded example, end to end on its quick variant: influence finds the planted facts."""

import json
import sys
from pathlib import Path

import numpy as np

from gradindex import Query, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from example_data import prepare_example  # noqa: E402


def test_fact_queries_rank_their_planted_sentences_first(tmp_path_factory):
    example = prepare_example(tmp_path_factory.mktemp("example"), quick=True)
    texts = [json.loads(line)["text"] for line in example.train_path.read_text().splitlines()]
    rows = [json.loads(line) for line in example.queries_path.read_text().splitlines()][:8]
    factors = pipeline.fit(example.model_dir, example.train_path, max_length=example.max_length, progress=False)
    result = pipeline.score(example.model_dir, factors, example.train_path, [Query(r["prompt"], r["completion"]) for r in rows],
                            max_length=example.max_length, progress=False)
    hits = 0
    for row, scores in zip(rows, result.scores):
        answer = row["completion"].strip().rstrip(".")
        top = [texts[i] for i in np.argsort(-scores)[:3]]
        hits += any(answer in t for t in top)
    assert hits >= 7, f"only {hits} of 8 fact queries have a supporting sentence in their top 3"
