"""Does the stage-1 sketch's hash matter? torch's generator (indexes before ``splitmix64-v1``) against the
fixed splitmix64 hash, on the embedded example, seed for seed:

- the example's eval figures (recall of every stage vs brute force, 40 fact + 40 text queries, both
  sides) for ``--seeds`` builds of each, sharing one set of factors and one brute-force pass;
- the normalised mean squared error of sketched stage-1 inner products against the unsketched ones on
  real whitened gradients (300 training sequences × the 80 queries), over ``--error-seeds`` seeds.

    python -m benchmarks.bench_sketch_hash --threads 2 --out benchmarks/results/sketch_hash.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.index_common import ROOT, example, fact_and_text_queries
from gradindex import CompressionConfig, GradIndex, build, evaluate, fit, load_model
from gradindex.compress import SKETCH_HASHES, Compressor
from gradindex.data import load_texts, tokenize_queries, tokenize_texts
from gradindex.scores import sequence_gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--error-seeds", type=int, default=16)
    parser.add_argument("--work", default=str(ROOT / "indexes" / "sketch-hash"))
    parser.add_argument("--out", default="benchmarks/results/sketch_hash.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art, work = example(), Path(args.work)
    lm = load_model(str(art.model_dir))
    factors_dir = work / "factors"
    if not (factors_dir / "factors.json").exists():
        fit(lm, art.train_path, max_length=art.max_length, out=factors_dir)
    kinds = fact_and_text_queries(art)
    report: dict = {"eval": {}, "stage1_error": {}}
    exact = None
    for seed in range(args.seeds):
        for scheme in SKETCH_HASHES:
            out = build(lm, art.train_path, work / f"{scheme}-{seed}", factors=factors_dir, max_length=art.max_length, progress=False,
                        compression=CompressionConfig(seed=seed, sketch_hash=scheme))
            index = GradIndex.open(out, model=lm)
            if exact is None:  # exact scores do not depend on the sketch: one brute-force pass serves every build
                exact = {kind: index.all_scores(qs) for kind, qs in kinds.items()}
            report["eval"][f"{scheme}-{seed}"] = {kind: evaluate(index, qs, k=10, exact=exact[kind], progress=False).to_dict()
                                                  for kind, qs in kinds.items()}
            print(scheme, seed, flush=True)
    factors = index.factors
    texts = load_texts(str(art.train_path))["text"]
    rows = np.random.default_rng(0).choice(len(texts), 300, replace=False)
    sets = {"train": tokenize_texts(lm.tokenizer, [texts[i] for i in rows], art.max_length),
            "query": tokenize_queries(lm.tokenizer, [q for qs in kinds.values() for q in qs], index.max_query_length)}
    rotated = {name: {n: factors.rotate(n, g).float() for n, g in sequence_gradients(lm.model, factors.specs, data).items()}
               for name, data in sets.items()}

    def inner_products(config: CompressionConfig) -> np.ndarray:
        c = Compressor(factors, config)
        v = {name: torch.cat([c.stage1(s.name, r[s.name]) for s in c.specs], 1) for name, r in rotated.items()}
        return (v["query"] @ v["train"].T).double().numpy()

    unsketched = inner_products(CompressionConfig(stage1="topl", stage1_dim=2**62))  # every entry: what the sketch estimates
    scale = np.sqrt((unsketched**2).mean(1, keepdims=True))
    for scheme in SKETCH_HASHES:
        errors = [float((((inner_products(CompressionConfig(seed=s, sketch_hash=scheme)) - unsketched) / scale) ** 2).mean())
                  for s in range(args.error_seeds)]
        report["stage1_error"][scheme] = {"mean": float(np.mean(errors)), "sem": float(np.std(errors) / np.sqrt(len(errors))), "per_seed": errors}
        print(scheme, report["stage1_error"][scheme]["mean"], flush=True)
    report["summary"] = summary(report["eval"], args.seeds)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


def summary(evals: dict, seeds: int) -> dict:
    """Per group: mean and range over seeds of recall@10, of stage-1 recall, and of the worst query's recall@10."""
    out = {}
    for kind in ("fact", "text"):
        for side in ("proponents", "opponents"):
            for scheme in SKETCH_HASHES:
                runs = [evals[f"{scheme}-{s}"][kind][side] for s in range(seeds)]
                out[f"{kind} {side} {scheme}"] = {
                    key: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                    for key, v in (("recall_at_k", [r["recall_at_k"] for r in runs]), ("stage1_recall", [r["stage1_recall"] for r in runs]),
                                   ("worst_query_recall_at_k", [min(r["per_query_recall"]) for r in runs]))
                }
    return out


if __name__ == "__main__":
    main()
