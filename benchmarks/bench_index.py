"""The index at scale: build throughput, query latency vs brute force, recall per stage, bytes, growth with N.

On the offline corpus of ``benchmarks/bench_corpus.py`` (≥ 100k real paragraphs + planted facts, tiny
GPT-2 trained on it), in one run:
- build throughput (sequences/s) vs plain forward+backward (parameter gradients) on the same batches;
- brute-force exact EK-FAC scores of every sequence for every query (the ground truth), timed;
- the real cascade (``GradIndex.query``) per query: recall@10 and top-10 opponents, p50/p95 latency,
  per kind of query (planted facts / ordinary text continuations);
- recall@10 for other compression settings (stage-1 sketches folded to fewer buckets, stage-2 codes
  truncated to lower rank) and FAISS index types, from the stored arrays;
- how the candidates each stage needs, and each stage's cost, grow with N (prefixes of the corpus).

    python -m benchmarks.bench_index --threads 2 --out benchmarks/results/index100k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_corpus import prepare_benchmark
from gradindex import GradIndex, ann, build, fit, load_model
from gradindex.compress import CompressionConfig
from gradindex.data import Query, collate, load_queries, plan_batches, tokenize_queries, tokenize_texts
from gradindex.evaluation import true_top
from gradindex.scores import query_gradients

K = 10
DEPTHS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
GRID = tuple(int(x) for x in np.unique(np.round(np.geomspace(10, 5000, 40))))  # depths for "needed k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=100_000, help="training sequences of the corpus")
    parser.add_argument("--limit", type=int, default=None, help="use only the first rows of the corpus (a smoke run)")
    parser.add_argument("--fit-sample", type=int, default=20_000, help="sequences the factors are fitted on")
    parser.add_argument("--sizes", default="12500,25000,50000,100000")
    parser.add_argument("--work", default="indexes/bench100k")
    parser.add_argument("--stage1-dim", type=int, default=CompressionConfig.stage1_dim)
    parser.add_argument("--stage2-rank", type=int, default=CompressionConfig.stage2_rank)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: index_types")
    parser.add_argument("--only", default="", help="re-run sections of a finished run: cascade,settings,index_types")
    parser.add_argument("--k1", type=int, default=None, help="cascade k1 (default: the library's)")
    parser.add_argument("--k2", type=int, default=None, help="cascade k2 (default: the library's)")
    parser.add_argument("--query-rank", type=int, default=None, help="cascade stage-2 rank (default: the built one)")
    parser.add_argument("--out", default="benchmarks/results/index100k.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"threads": args.threads}

    art = prepare_benchmark(n_sequences=args.n)
    lm = load_model(str(art.model_dir))
    import datasets

    data = datasets.load_dataset("json", data_files=str(art.train_path), split="train")
    if args.limit:
        data = data.select(range(args.limit))
    n = len(data)
    report["n_sequences"] = n

    # Factors on a random sample, as one would for a large corpus.
    factors_dir = work / "factors"
    if not (factors_dir / "factors.json").exists():
        sample = data.shuffle(seed=0).select(range(min(args.fit_sample, n)))
        t = time.perf_counter()
        fit(lm, sample, max_length=art.max_length, out=factors_dir)
        report["fit_seconds"] = time.perf_counter() - t
    index_dir = work / "index"
    if args.only:  # re-run some sections of a finished run, keeping the rest of its report
        report = json.loads(Path(args.out).read_text())
        index = GradIndex.open(index_dir, model=lm)
        kinds = {"fact": load_queries(art.fact_queries_path), "text": load_queries(art.text_queries_path)}
        queries = [q for qs in kinds.values() for q in qs]
        kind_of = np.array([k for k, qs in kinds.items() for _ in qs])
        exact = np.load(work / "exact.npy")
        if "cascade" in args.only:
            report["cascade"] = cascade(index, queries, kind_of, exact, report["brute_force_single_query_seconds"], args.k1, args.k2, args.query_rank)
            _save(report, args.out)
        if "settings" in args.only or "growth" in args.only:
            report["settings"], stage1, stage2 = settings_sweep(index, queries, kind_of, exact)
            report["growth"] = growth(index, kind_of, exact, stage1, stage2, [int(s) for s in args.sizes.split(",")])
            _save(report, args.out)
        if "index_types" in args.only:
            report["index_types"] = index_types(index, queries, kind_of, exact)
            _save(report, args.out)
        return
    compression = CompressionConfig(stage1_dim=args.stage1_dim, stage2_rank=args.stage2_rank)
    t = time.perf_counter()
    build(lm, data, index_dir, factors=factors_dir, max_length=art.max_length, compression=compression)
    report["build_seconds_this_run"] = time.perf_counter() - t
    manifest = json.loads((index_dir / "manifest.json").read_text())
    shard_seconds = sum(s["seconds"] for s in manifest["shards"])
    report["build"] = {
        "sequences_per_second": n / shard_seconds,
        "plain_forward_backward_per_second": plain_throughput(lm.model, lm.tokenizer, data, art.max_length, manifest["shard_size"]),
        "bytes_per_sequence": manifest["bytes_per_sequence"],
        "index_key": manifest["index"]["key"],
    }
    b = report["build"]
    b["throughput_ratio"] = b["sequences_per_second"] / b["plain_forward_backward_per_second"]
    print(json.dumps(report["build"]), flush=True)

    index = GradIndex.open(index_dir, model=lm)
    kinds = {"fact": load_queries(art.fact_queries_path), "text": load_queries(art.text_queries_path)}
    queries = [q for qs in kinds.values() for q in qs]
    kind_of = np.array([k for k, qs in kinds.items() for _ in qs])
    exact_path = work / "exact.npy"
    if exact_path.exists():
        exact = np.load(exact_path)
    else:
        t = time.perf_counter()
        exact = index.all_scores(queries, progress=True)
        report["brute_force_batched_seconds"] = time.perf_counter() - t
        np.save(exact_path, exact)
    report["brute_force_single_query_seconds"] = single_query_brute_force(index, queries[0], rows=8192)
    print("brute force per single query (s):", report["brute_force_single_query_seconds"], flush=True)

    report["cascade"] = cascade(index, queries, kind_of, exact, report["brute_force_single_query_seconds"], args.k1, args.k2, args.query_rank)
    print(json.dumps(report["cascade"]), flush=True)
    report["settings"], stage1, stage2 = settings_sweep(index, queries, kind_of, exact)
    _save(report, args.out)
    if "index_types" not in args.skip:
        report["index_types"] = index_types(index, queries, kind_of, exact)
        _save(report, args.out)
    report["growth"] = growth(index, kind_of, exact, stage1, stage2, [int(s) for s in args.sizes.split(",")])
    _save(report, args.out)
    print(f"wrote {args.out}")


def _save(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1, default=float))


def plain_throughput(model, tokenizer, data, max_length: int, rows: int) -> float:
    """Sequences/s of loss.backward() with parameter gradients on the builder's batches of the first shard."""
    tokenized = tokenize_texts(tokenizer, data[:rows]["text"], max_length)
    batches = [collate(tokenized, b) for b in plan_batches(tokenized, 2048)]
    model.train(False)
    t = time.perf_counter()
    for batch in batches:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
    return len(tokenized) / (time.perf_counter() - t)


def single_query_brute_force(index: GradIndex, query: Query, rows: int) -> float:
    """Seconds to score all N rows exactly for one query, timed on ``rows`` of them (cost is linear in N)."""
    t = time.perf_counter()
    tokenized = tokenize_queries(index.lm.tokenizer, [query], index.max_query_length)
    p = query_gradients(index.lm.model, index.factors, tokenized)
    rows = min(rows, index.n)
    chosen = np.random.default_rng(0).choice(index.n, rows, replace=False)
    index.rescore(p, index.training_set(chosen))
    return (time.perf_counter() - t) * index.n / rows


def truth_of(exact_row: np.ndarray, k: int = K) -> set:
    return true_top(exact_row, k)


def recall(truth: set, found, k: int = K) -> float:
    return min(k, len(truth & set(np.asarray(found).tolist()))) / k


def cascade(index: GradIndex, queries, kind_of, exact, brute_single: float, k1=None, k2=None, rank=None) -> dict:
    """The real query path (default k1/k2/rank unless given), per kind and side."""
    out = {"k1": k1, "k2": k2, "rank": rank}
    for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
        latencies, recalls, stages = [], [], {}
        for q, query in enumerate(queries):
            r = index.query_many([query], k=K, k1=k1, k2=k2, stage2_rank=rank, opponents=sign < 0)[0]
            latencies.append(r.seconds["total"])
            for s, v in r.seconds.items():
                stages.setdefault(s, []).append(v)
            recalls.append(recall(truth_of(sign * exact[q]), [h.row for h in r.hits]))
        recalls = np.array(recalls)
        out[side] = {
            **{f"recall@10 {kind}": float(recalls[kind_of == kind].mean()) for kind in sorted(set(kind_of))},
            "min recall@10": float(recalls.min()),
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p95": float(np.percentile(latencies, 95)),
            "stage_seconds_mean": {s: float(np.mean(v)) for s, v in stages.items()},
            "speedup_p50_vs_single_query_brute_force": brute_single / float(np.percentile(latencies, 50)),
        }
    return out


def fold(vectors: np.ndarray, layer_dim: int, n_layers: int, factor: int) -> np.ndarray:
    """A CountSketch of m buckets folded to m/f: bucket i absorbs i + m/f, … — itself a CountSketch."""
    v = vectors.reshape(len(vectors), n_layers, factor, layer_dim // factor)
    return v.sum(2).reshape(len(vectors), -1)


def settings_sweep(index: GradIndex, queries, kind_of, exact):
    """Recall for other settings, simulated from the stored arrays (stage 3 is exact, so the cascade's
    top-10 is the exact top-10 of its k2 survivors, known from ``exact``):
    - stage 1 folded to fewer buckets per layer: recall of the exact top-10 inside its top-d;
    - the full cascade for stage-2 rank × k1 × k2 at the built stage-1 size.
    """
    comp = index.compressor
    cfg = comp.config
    n_layers, layer_dim = len(comp.specs), cfg.stage1_dim
    embedding = comp.embed(index.lm.model, tokenize_queries(index.lm.tokenizer, queries, index.max_query_length))
    qv, whitened = embedding.vectors, embedding.whitened
    folds = [f for f in (1, 2, 4, 8) if layer_dim % f == 0]
    stage1 = {f: np.zeros((len(queries), index.n), np.float32) for f in folds}
    for j, v in enumerate(index.reader.vector_blocks()):
        start = j * index.reader.shard_size
        for f in folds:
            stage1[f][:, start : start + len(v)] = fold(qv, layer_dim, n_layers, f) @ fold(v, layer_dim, n_layers, f).T
    out = {"stage1": [], "cascade": []}
    for f in folds:
        row = {"stage1_dim_per_layer": layer_dim // f, "stage1_kib": 2 * n_layers * layer_dim / f / 1024}
        for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
            for kind in sorted(set(kind_of)):
                sel = np.nonzero(kind_of == kind)[0]
                orders = [np.argsort(-sign * stage1[f][q], kind="stable")[: max(DEPTHS)] for q in sel]
                truths = [truth_of(sign * exact[q]) for q in sel]
                row[f"{side} {kind}"] = {d: float(np.mean([recall(t, o[:d]) for t, o in zip(truths, orders)])) for d in DEPTHS}
        out["stage1"].append(row)
    print(json.dumps(out["stage1"]), flush=True)
    k1_max = 3000
    ranks = [r for r in (4, 8, 16) if r <= cfg.stage2_rank]
    stage2_scores = {}
    for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
        for q in range(len(queries)):
            cand = np.argsort(-sign * stage1[1][q], kind="stable")[:k1_max]
            codes = torch.from_numpy(index.reader.codes(cand))
            for r in ranks:
                s2 = comp.stage2_scores(codes[:, : r * comp.component_dim], {n: w[q : q + 1] for n, w in whitened.items()})[0].numpy()
                stage2_scores[(side, q, r)] = (cand, s2)
    for r in ranks:
        for k1 in (500, 1000, 2000, 3000):
            for k2 in (20, 50, 100, 200):
                res = {}
                for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
                    rec = []
                    for q in range(len(queries)):
                        cand, s2 = stage2_scores[(side, q, r)]
                        keep = np.argsort(-sign * s2[:k1], kind="stable")[:k2]
                        survivors = cand[:k1][keep]
                        final = survivors[np.argsort(-sign * exact[q][survivors], kind="stable")[:K]]
                        rec.append(recall(truth_of(sign * exact[q]), final))
                    rec = np.array(rec)
                    for kind in sorted(set(kind_of)):
                        res[f"{side} {kind}"] = float(rec[kind_of == kind].mean())
                out["cascade"].append({
                    "rank": r, "stage2_kib": 2 * r * sum(s.d_out + s.d_in for s in comp.specs) / 1024, "k1": k1, "k2": k2, **res,
                })
    print(json.dumps(out["cascade"][:4]), flush=True)
    return out, stage1, stage2_scores


def index_types(index: GradIndex, queries, kind_of, exact) -> list[dict]:
    """Stage-1 recall into the default k1 and search latency for each FAISS index type over the same vectors."""
    n, dim = index.n, index.manifest.vector_dim
    nlist = int(np.sqrt(n))
    keys = ["Flat", "SQfp16", f"IVF{nlist},SQ8"]  # PQ training took minutes even at 3,000 rows: left out
    qv = index.compressor.embed(index.lm.model, tokenize_queries(index.lm.tokenizer, queries, index.max_query_length)).vectors
    out = []
    for key in keys:
        t = time.perf_counter()
        idx = ann.build_index(key, dim, n, index.reader.vector_blocks, lambda rows: index.reader.vectors(rows).astype(np.float32), seed=0)
        build_seconds = time.perf_counter() - t
        row = {"key": key, "build_seconds": build_seconds, "bytes_per_sequence": idx.sa_code_size() if hasattr(idx, "sa_code_size") else None}
        for nprobe in ([None] if not key.startswith("IVF") else [nlist // 16, nlist // 4]):
            for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
                lat, rec = [], []
                for q in range(len(queries)):
                    t = time.perf_counter()
                    _, rows = ann.search(idx, sign * qv[q : q + 1], 1000, nprobe)
                    lat.append(time.perf_counter() - t)
                    rec.append(recall(truth_of(sign * exact[q]), rows[0][rows[0] >= 0]))
                rec = np.array(rec)
                row[f"nprobe={nprobe} {side}"] = {
                    "stage1_recall_in_1000": {kind: float(rec[kind_of == kind].mean()) for kind in sorted(set(kind_of))},
                    "search_ms_p50": 1000 * float(np.median(lat)),
                }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def growth(index: GradIndex, kind_of, exact, stage1, stage2, sizes) -> dict:
    """Candidates each stage needs for 0.95 recall of the exact top-10, and stage-1 scan time, per N."""
    comp = index.compressor
    r = comp.config.stage2_rank
    out = {"sizes": sizes, "k1_needed": {}, "k2_needed": {}, "flat_search_ms": []}
    vectors = np.concatenate(list(index.reader.vector_blocks()))
    for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
        for kind in sorted(set(kind_of)):
            need1, need2 = [], []
            for size in sizes:
                depth1 = {d: [] for d in GRID}
                depth2 = {d: [] for d in GRID if d <= 3000}
                for q in np.nonzero(kind_of == kind)[0]:
                    e = sign * exact[q][:size]
                    truth = truth_of(e)
                    order1 = np.argsort(-sign * stage1[1][q][:size], kind="stable")
                    for d in depth1:
                        depth1[d].append(recall(truth, order1[:d]))
                    # stage 2 ordering of the full-N top-2000 candidates restricted to this prefix
                    cand, s2 = stage2[(side, q, r)]
                    inside = cand < size
                    order2 = cand[inside][np.argsort(-sign * s2[inside], kind="stable")]
                    for d in depth2:
                        depth2[d].append(recall(truth, order2[:d]))
                need1.append(next((d for d in depth1 if np.mean(depth1[d]) >= 0.95), None))
                need2.append(next((d for d in depth2 if np.mean(depth2[d]) >= 0.95), None))
            out["k1_needed"][f"{side} {kind}"] = need1
            out["k2_needed"][f"{side} {kind}"] = need2
    q = np.random.default_rng(0).standard_normal((1, vectors.shape[1])).astype(np.float32)
    for size in sizes:
        idx = ann.faiss_module().IndexFlatIP(vectors.shape[1])
        idx.add(vectors[:size].astype(np.float32))
        t = time.perf_counter()
        for _ in range(5):
            idx.search(q, 1000)
        out["flat_search_ms"].append(1000 * (time.perf_counter() - t) / 5)
        del idx
    for key in ("k1_needed", "k2_needed"):
        out[f"{key}_exponent"] = {
            name: float(np.polyfit(np.log(sizes), np.log(v), 1)[0]) if all(v) else None for name, v in out[key].items()
        }
    out["flat_search_exponent"] = float(np.polyfit(np.log(sizes), np.log(out["flat_search_ms"]), 1)[0])
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
