"""Shared pieces of the index benchmarks: the example, its two kinds of queries, recall at depth."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np

from gradindex.data import Query

ROOT = Path(__file__).resolve().parent.parent


def example_data_module():
    """examples/example_data.py, imported by path (kronfluence's wheel ships a top-level ``examples``)."""
    name = "gradindex_example_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "example_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def example(quick: bool = False):
    return example_data_module().prepare_example(quick=quick)


def text_queries(texts: list[str], n: int, seed: int = 0, min_words: int = 12) -> list[Query]:
    """Ordinary continuations of training text: a paragraph's first words as prompt, the next few as completion."""
    rng = random.Random(seed)
    candidates = [t for t in texts if len(t.split()) >= min_words]
    out = []
    for text in rng.sample(candidates, min(n, len(candidates))):
        words = text.split()
        cut = rng.randint(6, min(12, len(words) - 5))
        out.append(Query(" ".join(words[:cut]), " " + " ".join(words[cut : cut + rng.randint(3, 6)])))
    return out


def fact_and_text_queries(art, n_text: int = 40) -> dict[str, list[Query]]:
    facts = [json.loads(line) for line in open(art.queries_path)]
    fact_queries = [Query(f["prompt"], f["completion"]) for f in facts]
    fact_texts = {" ".join(q.prompt.split()) for q in fact_queries}
    texts = [json.loads(line)["text"] for line in open(art.train_path)]
    texts = [t for t in texts if not any(f in t for f in fact_texts)]
    return {"fact": fact_queries, "text": text_queries(texts, n_text)}


def recall_at_depths(approx: np.ndarray, exact: np.ndarray, k: int, depths) -> dict[int, float]:
    """Mean over queries of the share of the exact top-k (ties included) inside approx's top-d."""
    out = {d: [] for d in depths if d <= approx.shape[1]}
    for a, e in zip(approx, exact):
        kth = np.partition(-e, k - 1)[k - 1] * -1
        truth = np.nonzero(e >= kth - 1e-6 * abs(kth))[0]
        rank_of = np.empty(len(a), np.int64)
        rank_of[np.argsort(-a, kind="stable")] = np.arange(len(a))
        ranks = np.sort(rank_of[truth])[:k]  # the best-placed k of the (possibly tied) true members
        for d in out:
            out[d].append(float(np.sum(ranks < d)) / k)
    return {d: float(np.mean(v)) for d, v in out.items()}
