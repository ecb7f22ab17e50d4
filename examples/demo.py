"""The embedded example, end to end and offline: train (or reuse) a tiny GPT-2 on Python's own docstrings
plus planted facts about invented entities, fit EK-FAC factors, build an influence index under
``indexes/``, and ask it which training sequences support a few of those facts.

    python examples/demo.py [--quick] [--queries 5] [--top 5] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# Some installed packages ship a top-level `examples` package, so import the sibling module by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from example_data import prepare_example  # noqa: E402
from gradindex import Factors, GradIndex, GradIndexError, LanguageModel, Query, build, fit, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cached_factors(lm: LanguageModel, train_path: Path, out: Path, max_length: int) -> Factors:
    """Reuse factors fitted earlier on this very model, else fit them."""
    try:
        factors = Factors.load(out)
        factors.check_model(lm.model_hash)
        print(f"reusing factors in {out}", file=sys.stderr)
        return factors
    except GradIndexError:
        started = time.perf_counter()
        factors = fit(lm, train_path, out=out, max_length=max_length)
        print(f"fitted factors in {time.perf_counter() - started:.1f}s -> {out}", file=sys.stderr)
        return factors


def example_index(quick: bool = False, cache: str | Path = ROOT / "examples" / ".cache", index: str | Path | None = None):
    """The example's data and its index, built (or reused) under ``indexes/``."""
    example = prepare_example(cache, quick=quick)
    lm = load_model(str(example.model_dir))
    factors_dir = example.model_dir / "factors"
    cached_factors(lm, example.train_path, factors_dir, example.max_length)
    index_dir = Path(index or ROOT / "indexes" / ("example-quick" if quick else "example"))
    started = time.perf_counter()
    # The example model was trained on each paragraph's first max_length tokens: the index holds what it saw.
    build(lm, example.train_path, index_dir, factors=factors_dir, max_length=example.max_length, chunk=False)
    print(f"index ready in {index_dir} ({time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return example, GradIndex.open(index_dir, model=lm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller variant used by the tests")
    parser.add_argument("--queries", type=int, default=5, help="how many planted-fact queries to ask")
    parser.add_argument("--top", type=int, default=5, help="distinct training texts shown per query")
    parser.add_argument("--cache", default=str(ROOT / "examples" / ".cache"), help="where the model and factors are kept")
    parser.add_argument("--index", default=None, help="index folder (default: indexes/example[-quick])")
    parser.add_argument("--check", action="store_true", help="also score every training sequence exactly and compare")
    args = parser.parse_args()

    example, index = example_index(args.quick, args.cache, args.index)
    rows = [json.loads(line) for line in example.queries_path.read_text().splitlines()][: args.queries]
    queries = [Query(r["prompt"], r["completion"]) for r in rows]
    # The planted sentences occur several times each: one line per distinct text, its copies counted.
    results = index.query_many(queries, k=min(index.n, args.top), distinct=True)
    for r in results:
        print(f"{r.prompt!r} → {r.completion!r}   ({r.seconds['total'] * 1000:.0f} ms)")
        for rank, hit in enumerate(r.hits, 1):
            copies = f" ×{len(hit.copies) + 1}" if hit.copies else ""
            print(f"  {rank}. {hit.score:+10.4g}  row {hit.row:5d}{copies:4}  {hit.text[:90]!r}")
        print()
    if args.check:
        exact = index.all_scores(queries)
        texts = index.reader.rows(np.arange(index.n), ("text",))["text"]
        for r, scores in zip(results, exact):
            best = list(dict.fromkeys(texts[i] for i in np.argsort(-scores)))[: len(r.hits)]
            found = len(set(best) & {h.text for h in r.hits}) / len(r.hits)
            print(f"recall of the exact top-{len(r.hits)} texts for {r.prompt!r}: {found:.2f}")

if __name__ == "__main__":
    main()
