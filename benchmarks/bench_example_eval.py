"""`gradindex eval` on the embedded example's index, for planted-fact and ordinary-text queries apart.

    python -m benchmarks.bench_example_eval [--threads 2] [--budget 64K] [--factor-share 0.75] [--out benchmarks/results/example_eval.json]

Builds (or reuses) the demo's index under indexes/example with the default settings, then compares
every stage with brute-force exact scores of all 4,010 training sequences.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.index_common import ROOT, example, fact_and_text_queries
from gradindex import CompressionConfig, GradIndex, build, evaluate, fit, load_model
from gradindex.options import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--index", default=str(ROOT / "indexes" / "example"))
    parser.add_argument("--budget", default=None, help="bytes per sequence, e.g. 16K (default: the library's)")
    parser.add_argument("--factor-share", type=float, default=None, help="share of the budget for low-rank factors (default: the library's)")
    parser.add_argument("--out", default="benchmarks/results/example_eval.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = example()
    lm = load_model(str(art.model_dir))
    factors_dir = art.model_dir / "factors"
    if not (factors_dir / "factors.json").exists():
        fit(lm, art.train_path, max_length=art.max_length, out=factors_dir)
    settings = {"budget": parse_size(args.budget)} if args.budget else {}
    compression = CompressionConfig(**settings, **({"factor_share": args.factor_share} if args.factor_share is not None else {}))
    build(lm, art.train_path, args.index, factors=factors_dir, max_length=art.max_length, compression=compression,
          chunk=False)  # as the example model was trained: each paragraph's first max_length tokens
    index = GradIndex.open(args.index, model=lm)
    report = {"budget": compression.budget, "factor_share": compression.factor_share, "code_dim": index.manifest.code_dim, "captured_variance": index.compressor.plan.captured,
              "bytes_per_sequence": index.manifest.bytes_per_sequence}
    for kind, queries in fact_and_text_queries(art).items():
        r = evaluate(index, queries, k=10).to_dict()
        for side in ("proponents", "opponents"):
            r[side]["per_query_recall"] = [round(x, 2) for x in r[side]["per_query_recall"]]
        report[kind] = r
        print(kind, json.dumps({s: {k: v for k, v in r[s].items() if "depth" not in k} for s in ("proponents", "opponents")}),
              f"p50 {r['latency_p50'] * 1000:.0f} ms, brute force {r['brute_force_seconds'] * 1000:.0f} ms/query (batched)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
