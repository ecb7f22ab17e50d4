"""Which compression keeps the exact top-10, per byte? Sweeps stage-1 schemes and stage-2 ranks in one pass.

For every setting it reports how deep in that stage's own ranking the exact EK-FAC top-10 lies
(recall of the exact top-10 inside the stage's top-d, proponents and opponents), which is what K₁
and K₂ must cover. Ground truth is brute-force exact scoring of every sequence.

    python -m benchmarks.bench_sweep --threads 1 [--quick] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.index_common import example, fact_and_text_queries, recall_at_depths
from gradindex import Factors, fit, load_model
from gradindex.compress import CompressionConfig, Compressor
from gradindex.data import load_texts, tokenize_queries, tokenize_texts
from gradindex.scores import compute_scores

DEPTHS = (10, 20, 50, 100, 200, 500, 1000)
STAGE1 = [
    ("sketch", 512, 1.0), ("sketch", 1024, 1.0), ("sketch", 2048, 1.0), ("sketch", 4096, 1.0),
    ("sketch", 2048, 0.1), ("sketch", 2048, 10.0),
    ("topl", 1024, 1.0), ("topl", 2048, 1.0), ("topl", 4096, 1.0), ("topl", 2048, 0.1),
]
RANKS = (4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the small example (CI-sized)")
    parser.add_argument("--n-text-queries", type=int, default=40)
    parser.add_argument("--power-iterations", type=int, default=CompressionConfig.power_iterations)
    parser.add_argument("--stage2-only", action="store_true", help="only the first stage-1 setting, with every rank")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = example(args.quick)
    lm = load_model(str(art.model_dir))
    model, tokenizer = lm.model, lm.tokenizer
    train = tokenize_texts(tokenizer, load_texts(str(art.train_path))["text"], art.max_length)
    factors: Factors = fit(lm, str(art.train_path), max_length=art.max_length, progress=False)
    kinds = fact_and_text_queries(art, args.n_text_queries)
    queries = [q for qs in kinds.values() for q in qs]
    kind_of = np.array([k for k, qs in kinds.items() for _ in qs])
    query_set = tokenize_queries(tokenizer, queries, 128)

    t = time.perf_counter()
    exact = compute_scores(model, factors, train, query_set, progress=False).scores
    print(f"brute force: {len(queries)} queries × {len(train)} sequences in {time.perf_counter() - t:.1f}s", flush=True)

    rows = []
    base = CompressionConfig(stage2_rank=max(RANKS), power_iterations=args.power_iterations)
    for scheme, dim, damping in STAGE1[:1] if args.stage2_only else STAGE1:
        config = replace(base, stage1=scheme, stage1_dim=dim, stage1_damping_scale=damping)
        comp = Compressor(factors, config)
        t = time.perf_counter()
        vectors, codes, _ = comp.encode(model, train, token_budget=2048)
        seconds = time.perf_counter() - t
        embedding = comp.embed(model, query_set)
        whitened = embedding.whitened
        s1 = embedding.vectors @ vectors.astype(np.float32).T
        rows.append(_row(f"stage 1 {scheme} {dim}/layer, damping {damping}×", comp.vector_dim * 2, s1, exact, kind_of, seconds))
        if (scheme, dim, damping) == STAGE1[0]:
            for rank in RANKS:
                keep = codes[:, : rank * comp.component_dim]  # a prefix of the stored codes is the lower rank
                s2 = np.concatenate([comp.stage2_scores(torch.from_numpy(keep[i : i + 256]), whitened).numpy() for i in range(0, len(keep), 256)], 1)
                rows.append(_row(f"stage 2 rank {rank}, {args.power_iterations} power iterations", keep.shape[1] * 2, s2, exact, kind_of, float("nan")))
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _row(name: str, nbytes: int, approx: np.ndarray, exact: np.ndarray, kind_of: np.ndarray, seconds: float) -> dict:
    row = {"setting": name, "kib_per_seq": round(nbytes / 1024, 1), "build_seconds": round(seconds, 1)}
    for kind in sorted(set(kind_of)):
        sel = kind_of == kind
        for side, sign in (("pro", 1), ("opp", -1)):
            rec = recall_at_depths(sign * approx[sel], sign * exact[sel], 10, DEPTHS)
            row[f"{kind}/{side}"] = {d: round(v, 3) for d, v in rec.items()}
    return row


if __name__ == "__main__":
    main()
