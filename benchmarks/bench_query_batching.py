"""Query batching with low-rank query gradients (Grosse et al. 2023 §3.3): what rank r costs in accuracy, saves in memory and time.

All 80 benchmark queries (40 planted facts, 40 text continuations) are scored in one pass over a random
sample of the 100k benchmark corpus, with full preconditioned query gradients and with each layer's
cut to rank r by SVD (the fastest of ``--repeats`` passes each). Per query: Spearman of the rank-r scores vs full over the sample, and the share of
the full top-10 in the rank-r top-10. Memory is what the held query gradients take; time is the whole
pass (forward+backward of the sample + contractions), per-sequence and per-token scores. Needs an
index of the 100k benchmark corpus (its model, factors and stored token ids), such as the one
``python -m benchmarks.bench_real --tiny100k`` builds, given with ``--index``.

    python -m benchmarks.bench_query_batching --threads 2 --out benchmarks/results/query_batching.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks.bench_corpus import prepare_benchmark
from gradindex.data import load_queries, tokenize_queries
from gradindex.scores import low_rank, query_bytes, query_gradients
from gradindex.search import GradIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--index", default="indexes/bench100k/index")
    parser.add_argument("--rows", type=int, default=4096, help="training sequences scored")
    parser.add_argument("--token-rows", type=int, default=256, help="sequences scored per token")
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the fastest of this many passes")
    parser.add_argument("--out", default="benchmarks/results/query_batching.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = prepare_benchmark()
    queries = load_queries(art.fact_queries_path) + load_queries(art.text_queries_path)
    index = GradIndex.open(args.index)
    rows = np.sort(np.random.default_rng(0).choice(index.n, args.rows, replace=False))
    train = index.training_set(rows)
    token_train = index.training_set(rows[: args.token_rows])
    tokenized = tokenize_queries(index.lm.tokenizer, queries, index.max_query_length)
    full = query_gradients(index.lm.model, index.factors, tokenized, token_budget=index.token_budget)

    def run(p, data, per_token):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = index.rescore(p, data, per_token=per_token)
            best = min(best, time.perf_counter() - t)
        return result.scores, best

    report = {"threads": args.threads, "repeats": args.repeats, "rows": args.rows, "token_rows": args.token_rows, "queries": len(queries),
              "layers": {s.name: [s.d_out, s.d_in] for s in index.factors.specs}}
    exact, seconds = run(full, train, False)
    _, token_seconds = run(full, token_train, True)
    report["full"] = {"query_bytes": query_bytes(full), "seconds": seconds, "per_token_seconds": token_seconds}
    for r in [int(x) for x in args.ranks.split(",")]:
        t = time.perf_counter()
        p = low_rank(full, r)
        svd_seconds = time.perf_counter() - t
        scores, seconds = run(p, train, False)
        _, token_seconds = run(p, token_train, True)
        rho = [spearmanr(a, b).statistic for a, b in zip(scores, exact)]
        top = [len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(scores, exact)]
        report[f"rank{r}"] = {
            "query_bytes": query_bytes(p), "memory_ratio": query_bytes(full) / query_bytes(p),
            "svd_seconds": svd_seconds, "seconds": seconds, "speedup": report["full"]["seconds"] / seconds,
            "per_token_seconds": token_seconds, "per_token_speedup": report["full"]["per_token_seconds"] / token_seconds,
            "spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
            "spearman_fact_mean": float(np.mean(rho[:40])), "spearman_text_mean": float(np.mean(rho[40:])),
            "top10_overlap_mean": float(np.mean(top)),
        }
        print(r, json.dumps(report[f"rank{r}"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
