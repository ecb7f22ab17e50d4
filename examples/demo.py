"""The embedded example, end to end and offline: train (or reuse) a tiny GPT-2 on Python's own docstrings
plus planted facts about invented entities, fit EK-FAC factors, and ask which training sequences
support a few of those facts.

    python examples/demo.py [--quick] [--queries 5] [--top 5]
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
from gradindex import Factors, Query, pipeline  # noqa: E402
from gradindex.errors import GradIndexError  # noqa: E402
from gradindex.model import load_model, model_fingerprint  # noqa: E402


def cached_factors(model, tokenizer, train_path: Path, out: Path, max_length: int) -> Factors:
    """Reuse factors fitted earlier on this very model, else fit them."""
    try:
        factors = Factors.load(out)
        factors.check_model(model_fingerprint(model))
        print(f"reusing factors in {out}", file=sys.stderr)
        return factors
    except GradIndexError:
        started = time.perf_counter()
        factors = pipeline.fit(model, train_path, tokenizer=tokenizer, out=out, max_length=max_length)
        print(f"fitted factors in {time.perf_counter() - started:.1f}s -> {out}", file=sys.stderr)
        return factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller variant used by the tests")
    parser.add_argument("--queries", type=int, default=5, help="how many planted-fact queries to ask")
    parser.add_argument("--top", type=int, default=5, help="training sequences shown per query")
    parser.add_argument("--cache", default="examples/.cache", help="where the model and factors are kept")
    args = parser.parse_args()

    example = prepare_example(args.cache, quick=args.quick)
    model, tokenizer = load_model(str(example.model_dir))
    factors = cached_factors(model, tokenizer, example.train_path, example.model_dir / "factors", example.max_length)
    texts = [json.loads(line)["text"] for line in example.train_path.read_text().splitlines()]
    rows = [json.loads(line) for line in example.queries_path.read_text().splitlines()][: args.queries]
    queries = [Query(r["prompt"], r["completion"]) for r in rows]

    started = time.perf_counter()
    result = pipeline.score(model, factors, example.train_path, queries, tokenizer=tokenizer, max_length=example.max_length, progress=False)
    print(f"exact EK-FAC scores for {len(queries)} queries × {len(texts)} training sequences in {time.perf_counter() - started:.1f}s\n")
    for query, scores in zip(queries, result.scores):
        print(f"{query.prompt!r} → {query.completion!r}")
        # The planted sentences occur several times each: show each distinct text once, with its copies.
        shown: dict[str, list[int]] = {}
        for row in np.argsort(-scores):
            shown.setdefault(texts[row], []).append(int(row))
            if len(shown) > args.top:
                break
        for rank, (text, rows) in enumerate(list(shown.items())[: args.top], 1):
            copies = f" ×{len(rows)}" if len(rows) > 1 else ""
            print(f"  {rank}. {scores[rows[0]]:+10.4g}  row {rows[0]:5d}{copies:4}  {text[:90]!r}")
        print()


if __name__ == "__main__":
    main()
