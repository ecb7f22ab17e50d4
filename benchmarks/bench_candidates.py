"""Where the exact rerank's candidates should come from: the index's stage 2, TF-IDF (the paper's lexical
filter) or both, at the same budget of k2 distinct texts; recall of the exact top-10 inside each.

On the 100k benchmark (brute-force scores cached as ``exact.npy`` by ``benchmarks.bench_index``), 40
planted-fact and 40 text-continuation queries, proponents and opponents, for several budgets k2.

    python -m benchmarks.bench_candidates --threads 2 --out benchmarks/results/candidates100k.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_corpus import prepare_benchmark
from gradindex.data import load_queries
from gradindex.evaluation import evaluate
from gradindex.search import GradIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="indexes/bench100k")
    parser.add_argument("--budgets", default="20,100")
    parser.add_argument("--out", default="benchmarks/results/candidates100k.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = prepare_benchmark()
    kinds = {"fact": load_queries(art.fact_queries_path), "text": load_queries(art.text_queries_path)}
    index = GradIndex.open(Path(args.work) / "index")
    exact = np.load(Path(args.work) / "exact.npy")
    report: dict = {"n": index.n, "k": 10}
    start = 0
    for kind, queries in kinds.items():
        rows = slice(start, start + len(queries))
        start += len(queries)
        for k2 in [int(b) for b in args.budgets.split(",")]:
            r = evaluate(index, queries, k=10, k2=k2, exact=exact[rows], progress=False)
            report[f"{kind}_k2_{k2}"] = {
                side: {"index": s.stage2_recall, "tfidf": s.tfidf_recall, "hybrid": s.hybrid_recall}
                for side, s in (("proponents", r.proponents), ("opponents", r.opponents))
            }
            print(kind, k2, json.dumps(report[f"{kind}_k2_{k2}"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
