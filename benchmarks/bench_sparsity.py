"""How concentrated influence is (Grosse et al. 2023 §5.2), and whether the report's fast estimate shows it.

For every benchmark query, the sparsity of its influence over the whole 100k corpus (share of Σ|I| in the
top 0.1 / 1 / 10 % of sequences, power-law tail exponent) from brute-force exact scores (``--work`` holds
an index of that corpus as ``index/``, e.g. the one ``bench_real --tiny100k`` builds, and its exact scores of
these queries as ``exact.npy``), from the stage-1 vectors (one pass over them), and, for the first
``--estimated`` queries of each kind, from the stratified estimate ``gradindex report`` draws by default
(the cascades' rescored shortlists + 1,000 random sequences, scored exactly); averaged per kind of query.

    python -m benchmarks.bench_sparsity --threads 2 --out benchmarks/results/sparsity.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_corpus import prepare_benchmark
from gradindex.analysis import estimated_influence, sparsity
from gradindex.data import load_queries
from gradindex.search import GradIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="indexes/bench100k")
    parser.add_argument("--estimated", type=int, default=10, help="queries of each kind given the stratified estimate")
    parser.add_argument("--out", default="benchmarks/results/sparsity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = prepare_benchmark()
    kinds = {"fact": load_queries(art.fact_queries_path), "text": load_queries(art.text_queries_path)}
    queries = [q for qs in kinds.values() for q in qs]
    index = GradIndex.open(Path(args.work) / "index")
    exact = np.load(Path(args.work) / "exact.npy")
    t = time.perf_counter()
    stage1 = index.all_scores(queries, exact=False)
    report = {"n": index.n, "stage1_seconds_per_query": (time.perf_counter() - t) / len(queries)}
    start = 0
    for kind, qs in kinds.items():
        rows = slice(start, start + len(qs))
        start += len(qs)
        t = time.perf_counter()
        estimated = []
        for q in qs[: args.estimated]:
            results = [index.query(q.prompt, q.completion, k=10, trace=True, opponents=o) for o in (False, True)]
            scores, weights = estimated_influence(index, results)
            estimated.append(sparsity(scores, weights=weights))
        report[f"{kind}_estimated_seconds_per_query"] = (time.perf_counter() - t) / len(estimated)
        m = len(estimated)
        for name, s in (("exact", [sparsity(x) for x in exact[rows]]), ("stage1", [sparsity(x) for x in stage1[rows]]),
                        (f"exact_first{m}", [sparsity(x) for x in exact[rows][:m]]), (f"estimated_first{m}", estimated)):
            report[f"{kind}_{name}"] = {
                "top_share": {str(f): float(np.mean([x.top_share[f] for x in s])) for f in s[0].top_share},
                "tail_exponent": float(np.mean([x.tail_exponent for x in s])),
            }
        truth = [sparsity(x) for x in exact[rows][:m]]
        report[f"{kind}_estimated_max_abs_error"] = {
            str(f): float(max(abs(a.top_share[f] - b.top_share[f]) for a, b in zip(estimated, truth))) for f in truth[0].top_share
        }
        # The stage-1 shares are biased; do they at least order the queries as the exact ones do?
        e = [sparsity(x).top_share[0.01] for x in exact[rows]]
        a = [sparsity(x).top_share[0.01] for x in stage1[rows]]
        report[f"{kind}_stage1_top1pct_correlation"] = float(np.corrcoef(e, a)[0, 1])
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
