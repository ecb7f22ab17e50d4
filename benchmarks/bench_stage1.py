"""Stage 1 at scale: recall into the shortlist and scan time per million rows, RaBitQ against a float16 scan.

    python -m benchmarks.bench_stage1 --index benchmarks/.cache/real/index100000_16K [--queries 50] [--k1 1000]
                                      [--keys HR,RaBitQ HR,RaBitQ4 HR,RaBitQfs SQfp16 Flat] [--out benchmarks/results/stage1.json]

The vectors are a built index's stage-1 prefixes (real whitened codes, as stage 1 sees them); the queries
are held-out rows of it (left out of the scanned set), since a query's code is made the same way. The truth
is the exact float32 inner product over the same prefixes (what an exact scan would shortlist), so what is
measured is each index type's own loss. Per type: bytes per row in the index, build seconds, search ms per
query alone (one query a call, as a lone `gradindex query` runs) and per query in a batch of all, both
scaled to 10⁶ rows, and the share of the exact top-10 inside its top-k1 (mean and worst query). The scans
are exhaustive, so time and bytes grow linearly with N: 10⁸ rows cost 100× the per-million figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="a built index whose stage-1 vectors are scanned")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k1", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keys", nargs="+", default=["HR,RaBitQ", "HR,RaBitQ4", "HR,RaBitQfs", "SQfp16", "Flat"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage1.json"))
    a = parser.parse_args(argv)
    import faiss

    from gradindex import ann, store
    from gradindex.reader import ShardReader

    faiss.omp_set_num_threads(a.threads)
    root = Path(a.index)
    manifest = store.load_manifest(root)
    reader = ShardReader(root, manifest.shards, manifest.compression.stage1_dim)
    vectors = np.concatenate([np.asarray(block, dtype=np.float32) for block in reader.vector_blocks()])
    held_out = np.random.default_rng(0).choice(len(vectors), a.queries, replace=False)
    keep = np.setdiff1d(np.arange(len(vectors)), held_out)
    queries, base = vectors[held_out], np.ascontiguousarray(vectors[keep])
    del vectors
    n, dim = base.shape
    truth = [set(np.argsort(-(base @ q))[:10].tolist()) for q in queries]
    result = {"index": str(root), "rows": n, "dim": dim, "queries": a.queries, "k1": a.k1, "threads": a.threads, "types": {}}
    for key in a.keys:
        started = time.perf_counter()
        index = ann.build_index(key, dim, n, lambda: iter([base]), lambda rows: base[rows])
        build = time.perf_counter() - started
        ann.search(index, queries[:1], a.k1)  # warm-up
        started = time.perf_counter()
        found = [ann.search(index, q[None], a.k1)[1][0] for q in queries]
        alone = (time.perf_counter() - started) / a.queries
        started = time.perf_counter()
        ann.search(index, queries, a.k1)
        batched = (time.perf_counter() - started) / a.queries
        recalls = [len(t & set(f.tolist())) / 10 for t, f in zip(truth, found)]
        per_million = 1e6 / n
        result["types"][key] = {
            "bytes_per_row": faiss.serialize_index(index).nbytes / n, "build_seconds": build,
            "ms_per_query_alone_per_million": alone * 1e3 * per_million, "ms_per_query_batched_per_million": batched * 1e3 * per_million,
            "recall10_in_k1_mean": float(np.mean(recalls)), "recall10_in_k1_worst": float(np.min(recalls)),
        }
        print(key, json.dumps({k: round(v, 3) for k, v in result["types"][key].items()}), flush=True)
        del index
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
