"""The embedded example, end to end on its quick variant: influence finds the planted facts."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradindex import Query, pipeline
from gradindex.pipeline import build
from gradindex.evaluation import evaluate
from gradindex.search import GradIndex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from example_data import load_facts, prepare_example  # noqa: E402
from order_flip import order_flip  # noqa: E402


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return prepare_example(tmp_path_factory.mktemp("example"), quick=True)


@pytest.fixture(scope="module")
def example_index(example, tmp_path_factory):
    """The quick example indexed with every default (factors fitted by the build)."""
    out = tmp_path_factory.mktemp("example_index") / "idx"
    build(example.model_dir, example.train_path, out, max_length=example.max_length, chunk=False, progress=False)  # as it was trained
    return GradIndex.open(out)


def test_fact_queries_rank_their_planted_sentences_first(example):
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


def test_index_with_default_settings_keeps_the_exact_top10_on_the_example(example, example_index):
    """The cascade at its default compression, k1 and k2, against brute force: facts and text queries."""
    rows = [json.loads(line) for line in example.queries_path.read_text().splitlines()][:6]
    texts = [json.loads(line)["text"] for line in example.train_path.read_text().splitlines()]
    queries = [Query(r["prompt"], r["completion"]) for r in rows]
    queries += [Query(" ".join(t.split()[:8]), " " + " ".join(t.split()[8:12])) for t in texts[:400:50] if len(t.split()) > 12]
    report = evaluate(example_index, queries, k=10, k1=300, progress=False)
    assert report.proponents.recall_at_k >= 0.95 and report.opponents.recall_at_k >= 0.95, report
    assert report.proponents.exact_max_rel_diff < 1e-4


def test_demo_builds_an_index_and_answers_through_it(example, tmp_path):
    """The README's first command, on the quick variant (reusing this module's cached example)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    cache = example.model_dir.parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "demo.py"), "--quick", "--cache", str(cache), "--index", str(tmp_path / "idx"), "--queries", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "idx" / "manifest.json").exists()
    first = json.loads(example.queries_path.read_text().splitlines()[0])
    assert first["prompt"] in done.stdout and first["completion"].strip() in done.stdout


def test_order_flip_reports_the_exact_influence_of_each_facts_own_sentences(example, example_index):
    facts = load_facts()[:3]
    result = order_flip(example_index, facts)
    texts = example_index.reader.rows(range(example_index.n), ("text",))["text"]  # the rows: long documents as windows
    factors = example_index.root / "factors"
    for fact, row in zip(facts, result["per_fact"]):
        own = np.array([t in fact["templates"] for t in texts])
        assert row["sentences"] == own.sum() > 0
        for direction, query in (("forward", Query(fact["prompt"], fact["completion"])),
                                 ("reverse", Query(fact["reverse_prompt"], fact["reverse_completion"]))):
            scores = pipeline.score(example.model_dir, factors, texts, [query], max_length=example.max_length,
                                    progress=False).scores[0]
            assert row[f"{direction}_mean"] == pytest.approx(scores[own].mean(), rel=1e-4)
            assert row[f"{direction}_relative"] == pytest.approx(scores[own].mean() / np.median(np.abs(scores[~own])), rel=1e-3)
            assert row[f"{direction}_top10_own"] == own[np.argsort(-scores, kind="stable")[:10]].mean()
    assert result["median_forward_relative"] == pytest.approx(np.median([r["forward_relative"] for r in result["per_fact"]]))


def test_the_example_trains_by_steps_and_its_recipe_retrains_it_bit_for_bit(example):
    """The example is step-based (a busy machine trains the same model, later), and init/ + recipe.json are all
    ``gradindex validate`` needs: retraining on every row reproduces the saved weights exactly."""
    from safetensors.torch import load_file

    from gradindex.data import tokenize_texts
    from gradindex.model import load_model
    from gradindex.training import TrainRecipe, train
    from example_data import QUICK

    meta = json.loads((example.model_dir.parent / "meta.json").read_text())
    recipe = TrainRecipe.load(example.recipe_path)
    assert meta["results"]["steps"] == recipe.steps == QUICK.steps and "max_train_seconds" not in meta["settings"]
    lm = load_model(example.init_dir)
    texts = [json.loads(line)["text"] for line in example.train_path.read_text().splitlines()]
    train(lm.model, tokenize_texts(lm.tokenizer, texts, example.max_length), recipe, progress=False)
    saved = load_file(example.model_dir / "model.safetensors")
    retrained = lm.model.state_dict()
    assert saved and all(torch.equal(retrained[name], tensor) for name, tensor in saved.items())
