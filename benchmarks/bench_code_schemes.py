"""Which fixed-size code ranks like exact EK-FAC on a real model: the shipped eigen-entry truncation against two
data-oblivious alternatives, at the same number of entries per sequence.

    python -m benchmarks.bench_code_schemes --model MODEL --factors FACTORS --data train.jsonl --queries q.jsonl
                                            [--rows 300] [--budget 64K] [--out benchmarks/results/code_schemes.json]

Schemes (every one spends the budget's ``code_dim`` entries, split evenly over layers for the last two):

* ``eigen-entries``: what the index stores (``codeplan``): the entries of largest u = Λ/(Λ+λ) of all layers;
* ``kron-random``: LoGra-style Kronecker projection per layer, Σ_t (M_S δ_t)(M_A a_t)ᵀ with
  M = Rᵀ diag(w) Qᵀ, R Gaussian and w a separable fit of (Λ + λ)^-1/2 (log(Λ+λ) ≈ x_i + y_j): as cheap to
  compute inside the capture as the eigen-entries;
* ``sketch-full``: a CountSketch (torch's generator) of each layer's exact whitened W (the full rotated gradient is formed:
  about one more forward+backward per sequence), an upper reference for data-oblivious codes.

Reported per scheme and query kind: Spearman with the exact scores over the rows, and the share of the exact
top-10 inside the scheme's top-d (mean and worst query), proponents and opponents.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gradindex import CompressionConfig, Factors, load_model
from gradindex.capture import capture
from gradindex.compress import Compressor
from gradindex.data import collate, load_queries, load_texts, plan_batches, tokenize_queries, tokenize_texts
from gradindex.factors import rotated_sequence_gradients
from gradindex.options import parse_size
from gradindex.scores import compute_scores


def separable_whitening(factors: Factors, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = factors.layers[name]
    log = torch.log(f.lam.double() + factors.damping(name))
    x = log.mean(1)
    y = log.mean(0) - log.mean()
    return torch.exp(-x / 2).float(), torch.exp(-y / 2).float()


def codes(lm, factors: Factors, data, config: CompressionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    dim = config.code_dim
    specs = factors.specs
    per_layer = max(1, dim // len(specs))
    k = max(1, int(per_layer**0.5))
    gen = torch.Generator().manual_seed(seed)
    kron, sketch = {}, {}
    for s in specs:
        f = factors.layers[s.name]
        w_s, w_a = separable_whitening(factors, s.name)
        r_s = torch.randn(s.d_out, k, generator=gen) / k**0.5
        r_a = torch.randn(s.d_in, k, generator=gen) / k**0.5
        kron[s.name] = ((f.q_s.float() * w_s) @ r_s, (f.q_a.float() * w_a) @ r_a)  # δ @ this, a @ this
        buckets = torch.randint(0, per_layer, (s.d_out * s.d_in,), generator=gen)
        signs = torch.randint(0, 2, (s.d_out * s.d_in,), generator=gen).float() * 2 - 1
        scale = (f.lam.float() + factors.damping(s.name)).rsqrt().flatten()
        sketch[s.name] = (buckets, signs * scale)
    out = {"eigen-entries": Compressor(factors, config).encode(lm.model, data)[0].astype(np.float32)}
    out["kron-random"] = np.zeros((len(data), len(specs) * k * k), np.float32)
    out["sketch-full"] = np.zeros((len(data), len(specs) * per_layer), np.float32)
    bases = {n: (f.q_a.float(), f.q_s.float()) for n, f in factors.layers.items()}
    index = {s.name: i for i, s in enumerate(specs)}
    for rows in plan_batches(data, 512):
        def on_layer(name, a, delta):
            i = index[name]
            m_s, m_a = kron[name]
            block = torch.einsum("bto,bti->boi", delta @ m_s, a @ m_a).flatten(1)
            out["kron-random"][rows, i * k * k : (i + 1) * k * k] = block.numpy()
            w = rotated_sequence_gradients(a, delta, *bases[name]).flatten(1) * sketch[name][1]
            folded = torch.zeros(len(rows), per_layer).index_add_(1, sketch[name][0], w)
            out["sketch-full"][rows, i * per_layer : (i + 1) * per_layer] = folded.numpy()

        capture(lm.model, specs, collate(data, rows), on_layer)
    return out


def measure(approx: np.ndarray, exact: np.ndarray, depths=(10, 20, 50, 100)) -> dict:
    out = {}
    for sign, side in ((1, "proponents"), (-1, "opponents")):
        for d in depths:
            recalls = [len(set(np.argsort(-sign * e)[:10]) & set(np.argsort(-sign * a)[:d])) / 10 for a, e in zip(approx, exact)]
            out[f"{side} top{d}"] = {"mean": float(np.mean(recalls)), "worst": float(np.min(recalls))}
    out["spearman"] = float(np.mean([spearmanr(a, e).statistic for a, e in zip(approx, exact)]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--factors", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--queries", nargs="+", required=True, help="jsonl files of queries, one kind each (named by the file)")
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--budget", default="64K")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/code_schemes.json"))
    a = p.parse_args(argv)
    lm = load_model(a.model)
    factors = Factors.load(a.factors)
    texts = load_texts(a.data)["text"][: a.rows]
    data = tokenize_texts(lm.tokenizer, texts, a.max_length)
    config = CompressionConfig(budget=parse_size(a.budget))
    stored = codes(lm, factors, data, config)
    result = {"rows": len(data), "code_dim": config.code_dim, "budget": a.budget, "kinds": {}}
    for path in a.queries:
        queries = load_queries(path)
        tokenized = tokenize_queries(lm.tokenizer, queries, 64)
        exact = compute_scores(lm.model, factors, data, tokenized, progress=False).scores
        query_codes = codes(lm, factors, tokenized, config)
        kind = Path(path).stem
        result["kinds"][kind] = {name: measure(query_codes[name] @ stored[name].T, exact) for name in stored}
        print(kind, json.dumps({n: {k: v for k, v in m.items() if k in ("spearman", "proponents top20", "opponents top20")}
                                for n, m in result["kinds"][kind].items()}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
