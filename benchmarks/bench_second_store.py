"""Would a second, larger store read only for the shortlist rank like exact EK-FAC on a real model?

    python -m benchmarks.bench_second_store --model MODEL --factors FACTORS --data train.jsonl \
        --queries fact.jsonl text.jsonl [--rows 500] [--blocks 32 64 128 256] [--ranks 1 2 4 8] \
        [--out benchmarks/results/second_store.json]

The index's code truncates both sides to the same few eigen-entries. A store read only for a shortlist
can afford to be asymmetric: the query's whitened gradient is computed in full at query time, and only the
training side is compressed. Per layer, the block of the ``k`` eigen-rows of S and ``k`` eigen-columns of A
of largest Σ Λ/(Λ + λ) is kept, and per sequence

* ``block@k``: the whole k × k block of its whitened gradient W = G̃ / sqrt(Λ + λ) (an upper bound for
  every code inside the block; k² entries per layer);
* ``lowrank@k,r``: the rank-r truncated SVD of that block (r · 2k numbers per layer), scored as
  Σ_r s_r u_rᵀ W_q v_r against the query's full block; ``+int8`` quantises each factor vector with its own
  absmax scale (what the store would hold), ``+int4`` to 4 bits.

Against them, ``entries``: the shipped code (``codeplan``: the budget's eigen-entries of largest
Λ/(Λ + λ) over all layers, both sides truncated). The truth is exact EK-FAC over the same rows. Reported
per scheme, query kind and side: the share of the exact top-10 inside the scheme's top-d (mean, worst
query), and bytes per sequence.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_code_schemes import Schemes, common_arguments, load_inputs, recall_report
from gradindex import Factors
from gradindex.capture import capture
from gradindex.data import collate, plan_batches
from gradindex.factors import rotated_sequence_gradients


QUANT = {"": None, "+int8": 127, "+int4": 7}


def quantise(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Round each vector (last axis) to ±``levels`` steps of its own absmax scale, and back."""
    if levels is None:
        return x
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
    return (x / scale).round().clamp(-levels, levels) * scale


class Blocks:
    """Each layer's top eigen-block (rows of S, columns of A by their summed Λ/(Λ + λ)) at every size."""

    def __init__(self, factors: Factors, sizes: list[int]):
        self.sizes, self.rsqrt, self.index = sizes, {}, {}
        for spec in factors.specs:
            f = factors.layers[spec.name]
            d = f.lam.double() + factors.damping(spec.name)
            u = f.lam.double() / d
            rows, cols = torch.argsort(-u.sum(1)), torch.argsort(-u.sum(0))
            self.rsqrt[spec.name] = d.rsqrt().float()
            self.index[spec.name] = {k: (rows[: min(k, spec.d_out)], cols[: min(k, spec.d_in)]) for k in sizes}

    def whitened(self, name: str, rotated: torch.Tensor) -> dict[int, torch.Tensor]:
        w = rotated * self.rsqrt[name]
        return {k: w[:, r][:, :, c] for k, (r, c) in self.index[name].items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p, rows=500)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/second_store.json"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    lm, factors, dim, data, kinds, qset = load_inputs(a)
    specs, names = factors.specs, [s.name for s in factors.specs]
    entries = Schemes(factors, dim, [1.0], [])
    entries.kron = {}
    blocks = Blocks(factors, a.blocks)
    bases = {n: (factors.layers[n].q_a.float(), factors.layers[n].q_s.float()) for n in names}
    n_q, rmax = len(qset), max(a.ranks)

    q_white = {s.name: torch.zeros(n_q, s.d_out * s.d_in, dtype=torch.float16) for s in specs}  # the truth's query side
    q_block = {(n, k): None for n in names for k in a.blocks}
    q_code = torch.zeros(n_q, dim)
    for rows in plan_batches(qset, a.token_budget):
        out = {"entries@1": torch.zeros(len(rows), dim)}

        def keep_query(name, a_, d_):
            r = rotated_sequence_gradients(a_, d_, *bases[name])
            q_white[name][rows] = (r * blocks.rsqrt[name]).flatten(1).half()
            for k, w in blocks.whitened(name, r).items():
                part = q_block[name, k] if q_block[name, k] is not None else torch.zeros(n_q, *w.shape[1:])
                part[rows] = w
                q_block[name, k] = part
            entries.layer(name, a_, d_, r, out)

        capture(lm.model, specs, collate(qset, rows), keep_query)
        q_code[rows] = out["entries@1"]
    print(f"queries embedded in {time.perf_counter() - started:.0f} s", flush=True)

    keys = ["exact", "entries"] + [f"block@{k}" for k in a.blocks] + [f"lowrank@{k},{r}{q}" for k in a.blocks for r in a.ranks for q in QUANT]
    scores = {key: np.zeros((n_q, len(data))) for key in keys}
    batches = list(plan_batches(data, a.token_budget))
    for b, rows in enumerate(batches):
        out = {"entries@1": torch.zeros(len(rows), dim)}

        def keep_row(name, a_, d_):
            r = rotated_sequence_gradients(a_, d_, *bases[name])
            entries.layer(name, a_, d_, r, out)
            w = (r * blocks.rsqrt[name]).flatten(1)
            scores["exact"][:, rows] += (q_white[name].float() @ w.T).double().numpy()
            for k, wb in blocks.whitened(name, r).items():
                qb = q_block[name, k]
                scores[f"block@{k}"][:, rows] += torch.einsum("qij,bij->qb", qb, wb).double().numpy()
                u, s, v = torch.svd_lowrank(wb, q=min(rmax + 8, *wb.shape[1:]), niter=3)  # randomized: a builder's cost
                u, vh = u[:, :, :rmax] * s[:, None, :rmax], v[:, :, :rmax].transpose(1, 2)  # singular values folded into u
                qu = torch.einsum("qij,bjr->qbir", qb, vh.transpose(1, 2))  # W_q v_r: (q, b, k, r)
                for quant, levels in QUANT.items():
                    uu, vv = quantise(u.transpose(1, 2), levels).transpose(1, 2), quantise(vh, levels)
                    qv = qu if not quant else torch.einsum("qij,bjr->qbir", qb, vv.transpose(1, 2))
                    per_rank = torch.einsum("qbir,bir->qbr", qv, uu).cumsum(-1)
                    for rank in a.ranks:
                        scores[f"lowrank@{k},{rank}{quant}"][:, rows] += per_rank[..., min(rank, per_rank.shape[-1]) - 1].double().numpy()

        capture(lm.model, specs, collate(data, rows), keep_row)
        scores["entries"][:, rows] = (q_code @ out["entries@1"].T).double().numpy()
        print(f"batch {b + 1}/{len(batches)} ({rows[-1] + 1} rows) {time.perf_counter() - started:.0f} s", flush=True)

    def nbytes(key: str) -> int:
        if key == "entries":
            return dim * 2
        if key == "exact":
            return sum(s.d_out * s.d_in for s in specs) * 2
        k = int(key.split("@")[1].split(",")[0])
        per_layer = [(min(k, s.d_out), min(k, s.d_in)) for s in specs]
        if key.startswith("block"):
            return sum(m * n for m, n in per_layer) * 2
        rank = int(key.split(",")[1].split("+")[0])
        if key.endswith("+int8"):
            return sum(rank * (m + n + 8) for m, n in per_layer)  # int8 entries + two float32 scales per rank
        if key.endswith("+int4"):
            return sum(rank * ((m + n) // 2 + 8) for m, n in per_layer)
        return sum(rank * (m + n) for m, n in per_layer) * 2

    truth = scores["exact"]
    result = {"model": a.model, "rows": len(data), "code_dim": dim, "budget": a.budget, "queries": {k: len(v) for k, v in kinds.items()}, "schemes": {}}
    for key in keys:
        entry = {"bytes": nbytes(key), **recall_report(truth, scores[key], kinds)}
        result["schemes"][key] = entry
        line = "  ".join(f"{ks}: {e['top20']['mean']:.2f}/{e['top50']['mean']:.2f}({e['top50']['worst']:.1f})"
                         for ks, e in entry.items() if ks != "bytes")
        print(f"{key:>18} {entry['bytes'] / 1024:9.1f} KiB  top-10 in top-20/top-50(worst)  {line}", flush=True)
    result["seconds"] = time.perf_counter() - started
    np.savez_compressed(a.out.with_suffix(".npz"), **{key: value.astype(np.float32) for key, value in scores.items()})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
