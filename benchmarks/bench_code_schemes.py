"""Which fixed-size code keeps the exact EK-FAC top-10 on a real model: every scheme at the same number of
entries per sequence, each with its own whitening damping, measured against exact scores at the user's damping.

    python -m benchmarks.bench_code_schemes --model MODEL --factors FACTORS --data train.jsonl \
        --queries fact.jsonl text.jsonl [--rows 1000] [--budget 64K] [--scales 1 10 100 1000] [--sketch-scales 1 100] \
        [--out benchmarks/results/code_schemes.json]

Schemes, for each damping scale s (the code whitens with λ_s = s × the factors' damping; exact scoring always
uses s = 1):

* ``exact``: the full whitened gradient, no compression: how much a heavier damping alone moves the top-10;
* ``entries``: what the index stores (``codeplan``): the ``code_dim`` eigen-entries of largest Λ/(Λ + λ_s);
* ``sketch``: a CountSketch of each layer's full whitened gradient, ``code_dim`` buckets shared over layers in
  proportion to their Σ Λ/(Λ + λ_s) (the allocation that minimises the summed sketch variance);
* ``hybrid``: half the entries as in ``entries``, the other half a CountSketch of everything else;
* ``kron``: LoGra-style Kronecker Gaussian projection per layer, Σ_t (M_S δ_t)(M_A a_t)ᵀ, with a separable
  fit of (Λ + λ_s)^-1/2 folded into M (as cheap inside the capture as the entries).

Reported per scheme, query kind and side: the share of the exact top-10 inside the scheme's top-d (mean,
worst query), d = 10, 20, 50, 100, 200, and the Spearman correlation with the exact scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gradindex import CompressionConfig, Factors, load_model
from gradindex.capture import capture
from gradindex.corpus import load_texts
from gradindex.data import collate, load_queries, plan_batches, tokenize_queries, tokenize_texts
from gradindex.factors import rotated_sequence_gradients
from gradindex.options import parse_size

DEPTHS = (10, 20, 50, 100, 200)


class Schemes:
    """Every scheme's code of one layer's rotated gradients, for all damping scales at once."""

    def __init__(self, factors: Factors, dim: int, scales: list[float], sketch_scales: list[float], seed: int = 0):
        self.factors, self.dim, self.scales = factors, dim, scales
        specs = factors.specs
        gen = torch.Generator().manual_seed(seed)
        self.inv, self.rsqrt = {}, {}  # (name, s) -> 1 / (Λ + λ_s) and its square root, flattened
        u = {}
        for spec in specs:
            lam = factors.layers[spec.name].lam.double().flatten()
            for s in scales:
                d = lam + factors.damping(spec.name) * s
                self.inv[spec.name, s] = (1 / d).float()
                self.rsqrt[spec.name, s] = d.rsqrt().float()
                u[spec.name, s] = (lam / d)
        self.plans: dict[str, dict] = {}  # scheme@s -> {name: (...)}
        self.perm, self.signs = {}, {}
        for s in scales:
            weight = {spec.name: u[spec.name, s] for spec in specs}
            for scheme, n_top in (("entries", dim), ("hybrid", dim // 2)) if s in sketch_scales else (("entries", dim),):
                plan, slot = self._top_entries(weight, n_top)
                if n_top < dim:  # the rest of the slots sketch what the kept entries leave
                    totals = {n: float(w.sum() - w[plan[n][0][0]].sum()) for n, w in weight.items()}
                    plan = self._sketch_plan(specs, plan, totals, slot, dim - n_top, gen)
                self.plans[f"{scheme}@{s:g}"] = plan
            if s not in sketch_scales:
                continue
            totals = {spec.name: float(u[spec.name, s].sum()) for spec in specs}
            self.plans[f"sketch@{s:g}"] = self._sketch_plan(specs, {spec.name: [None, None] for spec in specs}, totals, 0, dim, gen)
        self.kron = {}
        k = max(1, int((dim / len(specs)) ** 0.5))
        self.kron_k = k
        for s in (scales[0], scales[-1]):
            m = {}
            for spec in specs:
                f = factors.layers[spec.name]
                log = torch.log(f.lam.double() + factors.damping(spec.name) * s)
                w_s, w_a = torch.exp(-(log.mean(1)) / 2), torch.exp(-(log.mean(0) - log.mean()) / 2)
                r_s = torch.randn(spec.d_out, k, generator=gen, dtype=torch.float64) / k**0.5
                r_a = torch.randn(spec.d_in, k, generator=gen, dtype=torch.float64) / k**0.5
                m[spec.name] = (((f.q_s.double() * w_s) @ r_s).float(), ((f.q_a.double() * w_a) @ r_a).float())
            self.kron[f"kron@{s:g}"] = m

    def _sketch_plan(self, specs, plan, totals, start, width, gen):
        """Buckets of equal size over a random permutation of each layer's entries (a CountSketch whose
        buckets are balanced: a gather and a sum instead of a scatter), ``width`` slots shared in proportion to
        ``totals``."""
        weights = np.array([max(totals[spec.name], 0.0) for spec in specs])
        share = np.floor(weights / weights.sum() * width).astype(int)
        share[np.argsort(-weights)[: width - share.sum()]] += 1
        slot = start
        for spec, m in zip(specs, share):
            n = spec.d_out * spec.d_in
            if spec.name not in self.perm:
                self.perm[spec.name] = torch.randperm(n, generator=gen)
                self.signs[spec.name] = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
            signs = self.signs[spec.name]
            if plan[spec.name][0] is not None and len(plan[spec.name][0][0]):
                signs = signs.clone()
                signs[plan[spec.name][0][0]] = 0  # kept exactly already
            plan[spec.name][1] = (slot, int(m), signs) if m else None
            slot += int(m)
        return plan

    def _top_entries(self, weight: dict[str, torch.Tensor], n_top: int) -> tuple[dict, int]:
        """A plan keeping the ``n_top`` entries of largest ``weight`` over all layers, and the slots it filled."""
        specs = self.factors.specs
        top = torch.topk(torch.cat([weight[spec.name].flatten().double() for spec in specs]), n_top).indices
        owner = torch.cat([torch.full((spec.d_out * spec.d_in,), i) for i, spec in enumerate(specs)])
        offset = np.cumsum([0] + [spec.d_out * spec.d_in for spec in specs])
        plan, slot = {}, 0
        for i, spec in enumerate(specs):
            mine = top[owner[top] == i] - int(offset[i])
            plan[spec.name] = [(mine, torch.arange(slot, slot + len(mine))), None]
            slot += len(mine)
        return plan, slot

    def add_entries(self, key: str, weight: dict[str, torch.Tensor]) -> None:
        """An entries scheme that keeps the ``dim`` entries of largest ``weight`` (per layer, flattened)."""
        self.plans[key] = self._top_entries(weight, self.dim)[0]

    def names(self) -> list[str]:
        return [f"exact@{s:g}" for s in self.scales] + list(self.plans) + list(self.kron)

    def layer(self, name: str, a: torch.Tensor, delta: torch.Tensor, rotated: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """Add one layer's contribution to every scheme's codes ``out[scheme]`` (B, dim)."""
        flat = rotated.flatten(1)
        for key, plan in self.plans.items():
            s = float(key.split("@")[1])
            w = flat * self.rsqrt[name, s]
            entry, sketch = plan[name]
            if entry is not None and len(entry[0]):
                out[key][:, entry[1]] = w[:, entry[0]]
            if sketch is not None:
                slot, m, signs = sketch
                c = -(-w.shape[1] // m)
                g = (w * signs)[:, self.perm[name]]
                g = torch.nn.functional.pad(g, (0, m * c - g.shape[1]))
                out[key][:, slot : slot + m] = g.view(len(g), m, c).sum(-1)
        for key, m in self.kron.items():
            i = [spec.name for spec in self.factors.specs].index(name)
            k2 = self.kron_k**2
            out[key][:, i * k2 : (i + 1) * k2] = torch.einsum("bto,bti->boi", delta @ m[name][0], a @ m[name][1]).flatten(1)


def common_arguments(p: argparse.ArgumentParser, rows: int) -> None:
    """What every code benchmark reads: model, factors, rows of data, query files (one kind each), budget."""
    p.add_argument("--model", required=True)
    p.add_argument("--factors", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--queries", nargs="+", required=True, help="query jsonl files, one kind each (named by the file's stem)")
    p.add_argument("--rows", type=int, default=rows)
    p.add_argument("--budget", default="64K")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--token-budget", type=int, default=1024)


def load_inputs(a: argparse.Namespace):
    """Model, factors, the code length of the budget, tokenized rows, query kinds and tokenized queries."""
    torch.manual_seed(0)
    lm = load_model(a.model)
    factors = Factors.load(a.factors)
    dim = CompressionConfig(budget=parse_size(a.budget)).code_dim
    data = tokenize_texts(lm.tokenizer, load_texts(a.data)["text"][: a.rows], a.max_length)
    kinds = {Path(q).stem: load_queries(q) for q in a.queries}
    qset = tokenize_queries(lm.tokenizer, [q for qs in kinds.values() for q in qs], 64)
    return lm, factors, dim, data, kinds, qset


def recall_report(truth: np.ndarray, scores: np.ndarray, kinds: dict) -> dict:
    """Per query kind and side: the share of the exact top-10 inside the scheme's top-d (mean, worst query)
    and the Spearman correlation with the exact scores."""
    entry, start = {}, 0
    for kind, qs in kinds.items():
        span, start = range(start, start + len(qs)), start + len(qs)
        for sign, side in ((1, "proponents"), (-1, "opponents")):
            rec, rhos = {d: [] for d in DEPTHS}, []
            for qi in span:
                t, s = sign * truth[qi], sign * scores[qi]
                top, order = set(np.argsort(-t)[:10].tolist()), np.argsort(-s)
                for d in DEPTHS:
                    rec[d].append(len(top & set(order[:d].tolist())) / 10)
                rhos.append(spearmanr(t, s).statistic)
            entry[f"{kind} {side}"] = {"spearman": float(np.mean(rhos)),
                                       **{f"top{d}": {"mean": float(np.mean(v)), "worst": float(np.min(v))} for d, v in rec.items()}}
    return entry


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p, rows=1000)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0])
    p.add_argument("--energy-data", help="also measure entries chosen by their mean square W² over these sequences' true-label gradients")
    p.add_argument("--energy-rows", type=int, default=100)
    p.add_argument("--sketch-scales", type=float, nargs="*", default=[1.0, 100.0], help="the scales the sketch and hybrid schemes are measured at")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/code_schemes.json"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    lm, factors, dim, data, kinds, qset = load_inputs(a)
    specs, names = factors.specs, [s.name for s in factors.specs]
    schemes = Schemes(factors, dim, a.scales, a.sketch_scales)
    bases = {n: (factors.layers[n].q_a.float(), factors.layers[n].q_s.float()) for n in names}
    if a.energy_data:
        energy_set = tokenize_texts(lm.tokenizer, load_texts(a.energy_data)["text"][: a.energy_rows], a.max_length)
        energy = {s.name: torch.zeros(s.d_out * s.d_in) for s in specs}

        def accumulate(name, a_, d_):
            energy[name] += (rotated_sequence_gradients(a_, d_, *bases[name]).flatten(1).square() * schemes.inv[name, a.scales[0]]).sum(0)

        for rows in plan_batches(energy_set, a.token_budget):
            capture(lm.model, specs, collate(energy_set, rows), accumulate)
        schemes.add_entries(f"data-entries@{a.scales[0]:g}", energy)
        u_energy = {s.name: energy[s.name] * (factors.layers[s.name].lam.flatten() * schemes.inv[s.name, a.scales[0]]) for s in specs}
        schemes.add_entries(f"data-u-entries@{a.scales[0]:g}", u_energy)
        print(f"energy of {len(energy_set)} sequences in {time.perf_counter() - started:.0f} s", flush=True)
    keys = schemes.names()
    n_q = len(qset)

    # the queries' rotated gradients, float16 (the truth's inner products average that rounding away)
    q_rot = {s.name: torch.zeros(n_q, s.d_out, s.d_in, dtype=torch.float16) for s in specs}
    q_codes = {k: torch.zeros(n_q, dim) for k in keys if not k.startswith("exact")}
    for rows in plan_batches(qset, a.token_budget):
        out = {k: torch.zeros(len(rows), dim) for k in q_codes}

        def keep_query(name, a_, d_):
            r = rotated_sequence_gradients(a_, d_, *bases[name])
            q_rot[name][rows] = r.half()
            schemes.layer(name, a_, d_, r, out)

        capture(lm.model, specs, collate(qset, rows), keep_query)
        for k in q_codes:
            q_codes[k][rows] = out[k]
    print(f"queries embedded in {time.perf_counter() - started:.0f} s", flush=True)

    scores = {k: np.zeros((n_q, len(data))) for k in keys}
    batches = list(plan_batches(data, a.token_budget))
    for b, rows in enumerate(batches):
        out = {k: torch.zeros(len(rows), dim) for k in q_codes}

        def keep_row(name, a_, d_):
            r = rotated_sequence_gradients(a_, d_, *bases[name])
            schemes.layer(name, a_, d_, r, out)
            flat, qf = r.flatten(1), q_rot[name].flatten(1).float()
            for s in a.scales:
                scores[f"exact@{s:g}"][:, rows] += ((qf * schemes.inv[name, s]) @ flat.T).double().numpy()

        capture(lm.model, specs, collate(data, rows), keep_row)
        for k in q_codes:
            scores[k][:, rows] = (q_codes[k] @ out[k].T).double().numpy()
        if b % 5 == 0:
            print(f"batch {b + 1}/{len(batches)} ({rows[-1] + 1} rows) {time.perf_counter() - started:.0f} s", flush=True)

    truth = scores["exact@1"]
    result = {"model": a.model, "rows": len(data), "code_dim": dim, "budget": a.budget, "queries": {k: len(v) for k, v in kinds.items()},
              "kron_k": schemes.kron_k, "schemes": {}}
    for key in keys:
        entry = recall_report(truth, scores[key], kinds)
        result["schemes"][key] = entry
        line = "  ".join(f"{ks}: {e['top50']['mean']:.2f}/{e['top50']['worst']:.1f} ρ{e['spearman']:.2f}" for ks, e in entry.items())
        print(f"{key:>14}  top-10 in top-50 (mean/worst)  {line}", flush=True)
    result["seconds"] = time.perf_counter() - started
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
