"""Is the influence true? LDS and leave-top-k-out of every preconditioner on the quick embedded example.

    python -m benchmarks.bench_validate [--subsets 30] [--facts 8] [--texts 8] [--reverse 8] [--leave-out-queries 6] [--out benchmarks/results/validate.json]

The quick example (2-layer GPT-2, trained 1,000 steps from init/ by recipe.json) is retrained from the same
initialisation on `--subsets` random halves of its data (LDS) and, for the first `--leave-out-queries`
queries (half facts, half text), without each method's top 10 / 50 / 100 (leave-top-k-out); the index's
own answers (built here with every default) are left out too. `--reverse` adds the facts asked backwards (object →
subject, never stated that way in training) to the LDS only: measured on the cached models, no retraining. Runs are cached under
indexes/validate-quick/, so a rerun continues; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from benchmarks.index_common import ROOT, example, fact_and_text_queries
from gradindex import Query, pipeline
from gradindex.validation import ValidationConfig

WORK = ROOT / "indexes" / "validate-quick"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subsets", type=int, default=30)
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--reverse", type=int, default=8)
    ap.add_argument("--leave-out-queries", type=int, default=6)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "validate.json"))
    args = ap.parse_args()
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    art = example(quick=True)
    kinds = fact_and_text_queries(art, n_text=args.texts)
    facts, texts = kinds["fact"][: args.facts], kinds["text"][: args.texts]
    half = args.leave_out_queries // 2  # the queries left out come first: half facts, half text
    queries = facts[:half] + texts[:half] + facts[half:] + texts[half:]
    groups = ["facts"] * half + ["text"] * half + ["facts"] * (len(facts) - half) + ["text"] * (len(texts) - half)
    reverse = [Query(r["prompt"], r["completion"]) for r in map(json.loads, art.reverse_queries_path.read_text().splitlines()[: args.reverse])]
    queries, groups = queries + reverse, groups + ["reverse"] * len(reverse)
    index = WORK / "index"
    if not (index / "manifest.json").exists():
        pipeline.build(art.model_dir, art.train_path, index, max_length=art.max_length, chunk=False)  # as it was trained
    started = time.perf_counter()
    report = pipeline.validate(art.model_dir, art.init_dir, art.recipe_path, art.train_path, queries, WORK / "runs",
                               config=ValidationConfig(subsets=args.subsets, leave_out_queries=args.leave_out_queries),
                               optimizer_state=art.optimizer_path, index=index, groups=groups, max_length=art.max_length)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = "python -m benchmarks.bench_validate " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("fresh", "out"))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{report['queries']} queries, {report['subsets']} subsets, {report['retrained_now']} retrained in {report['seconds']:.0f} s -> {args.out}")
    for group in ("facts", "text", "reverse")[: 3 if args.reverse else 2]:
        print(f"\n{group}: method | LDS [95% CI] | leave-top-10-out | 50 | 100 (drop of log p)")
        for name, e in report["preconditioners"].items():
            g = e["groups"][group]
            lds = f"{g['lds']:+.3f} [{g['lds_ci'][0]:+.2f}, {g['lds_ci'][1]:+.2f}]" if g.get("lds") is not None else "-"
            drops = [g[f"leave_top{k}_out"] for k in (10, 50, 100)]
            print(f"{name:9s} | {lds} | " + " | ".join("-" if d is None else f"{d:+.3f}" for d in drops))


if __name__ == "__main__":
    main()
