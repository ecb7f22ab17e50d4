"""Exact EK-FAC influence of training sequences on queries — the ground truth everything else is measured against.

I(q, z) = Σ_layers Σ_t δ_{z,t}ᵀ P_q a_{z,t},  with P_q = H⁻¹ G_q the preconditioned query gradient.
Training gradients are never stored: each batch's token matrices are contracted with every P_q at
once, and the per-token terms are the token-wise influences.
Both gradients are of summed negative log-likelihoods, so I > 0 means up-weighting z raises
log p(completion | prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import capture, device_and_dtype
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .factors import Factors
from .layers import LayerSpec

# Largest intermediate (in elements) a contraction may form before it is split; ~256 MB of float32.
_MAX_ELEMENTS = 64 * 2**20


@dataclass
class ScoreResult:
    """``scores[q, n]``: influence of training sequence n on query q (float32).

    ``per_layer[name][q, n]`` sums over layers to ``scores``; ``per_token[n][q, t]`` is token t's share
    of sequence n's influence and sums over t to ``scores[q, n]``.
    """

    scores: np.ndarray
    per_layer: dict[str, np.ndarray] | None = None
    per_token: list[np.ndarray] | None = None
    n_truncated: int = 0  # training sequences cut to the maximum length


def sequence_gradients(
    model: nn.Module, layers: list[LayerSpec], data: TokenizedSet, *, pad_id: int, token_budget: int = DEFAULT_TOKEN_BUDGET
) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of the summed NLL of the scored tokens, (n, d_out, d_in) per layer."""
    device, dtype = device_and_dtype(model)
    grads = {s.name: torch.zeros(len(data), s.d_out, s.d_in, dtype=dtype, device=device) for s in layers}
    for rows in plan_batches(data, token_budget):
        captured, _ = capture(model, layers, collate(data, rows, pad_id).to(device))
        index = torch.tensor(rows, device=device)
        for name, c in captured.items():
            grads[name][index] = torch.einsum("bto,bti->boi", c.delta.to(dtype), c.a.to(dtype))
    return grads


def query_gradients(
    model: nn.Module,
    factors: Factors,
    queries: TokenizedSet,
    *,
    pad_id: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    damping: float | None = None,
    damping_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Preconditioned query gradients P_q = H⁻¹ G_q, (n_queries, d_out, d_in) per layer."""
    grads = sequence_gradients(model, factors.specs, queries, pad_id=pad_id, token_budget=token_budget)
    return {name: factors.precondition(name, g, damping, damping_scale) for name, g in grads.items()}


def contract(p: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Σ_t δ_tᵀ P_q a_t for every query q and sequence b: (Q, B), or (Q, B, T) per token.

    Per token (or for a single query) it goes through the token matrices; otherwise it forms each
    sequence's gradient once and reuses it for every query, which is cheaper whenever Q > 1.
    """
    n_q, d_out, d_in = p.shape
    n_b, n_t = a.shape[:2]
    if per_token or n_q * n_t <= n_q + n_t:
        step = max(1, _MAX_ELEMENTS // max(1, n_b * n_t * d_out))
        parts = [torch.einsum("bti,qoi,bto->qbt", a, p[i : i + step], delta) for i in range(0, n_q, step)]
        out = torch.cat(parts)
        return out if per_token else out.sum(-1)
    step = max(1, _MAX_ELEMENTS // (d_out * d_in))
    flat = p.reshape(n_q, -1)
    parts = [flat @ torch.einsum("bto,bti->boi", delta[i : i + step], a[i : i + step]).reshape(-1, d_out * d_in).T for i in range(0, n_b, step)]
    return torch.cat(parts, dim=1)


def compute_scores(
    model: nn.Module,
    factors: Factors,
    train: TokenizedSet,
    queries: TokenizedSet,
    *,
    pad_id: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    damping: float | None = None,
    damping_scale: float | None = None,
    per_layer: bool = False,
    per_token: bool = False,
    progress: bool = True,
) -> ScoreResult:
    """Exact EK-FAC influence of every training sequence on every query."""
    p = query_gradients(model, factors, queries, pad_id=pad_id, token_budget=token_budget, damping=damping, damping_scale=damping_scale)
    return score_preconditioned(
        model, factors.specs, p, train, pad_id=pad_id, token_budget=token_budget,
        per_layer=per_layer, per_token=per_token, progress=progress,
    )


def score_preconditioned(
    model: nn.Module,
    layers: list[LayerSpec],
    p: dict[str, torch.Tensor],
    train: TokenizedSet,
    *,
    pad_id: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    per_layer: bool = False,
    per_token: bool = False,
    progress: bool = True,
) -> ScoreResult:
    """Exact influence of every sequence of ``train`` given preconditioned query gradients P_q (Q, d_out, d_in)."""
    device, dtype = device_and_dtype(model)
    n_q, n = next(iter(p.values())).shape[0], len(train)
    layer_scores = {s.name: torch.zeros(n_q, n, dtype=torch.float64) for s in layers}
    token_scores: list[np.ndarray | None] = [np.zeros((n_q, len(ids)), np.float32) for ids in train.input_ids] if per_token else []
    for rows in tqdm(plan_batches(train, token_budget), desc="scoring", disable=not progress, unit="batch"):
        batch = collate(train, rows, pad_id).to(device)
        captured, _ = capture(model, layers, batch)
        tokens_total = None
        for name, c in captured.items():
            s = contract(p[name], c.a.to(dtype), c.delta.to(dtype), per_token=per_token)
            if per_token:
                tokens_total = s if tokens_total is None else tokens_total + s
                s = s.sum(-1)
            layer_scores[name][:, rows] = s.double().cpu()
        if per_token:
            tokens_total = tokens_total.float().cpu().numpy()
            for b, r in enumerate(rows):
                token_scores[r] = tokens_total[:, b, : len(train.input_ids[r])]
    total = sum(layer_scores.values())
    return ScoreResult(
        scores=total.float().numpy(),
        per_layer={k: v.float().numpy() for k, v in layer_scores.items()} if per_layer else None,
        per_token=token_scores if per_token else None,
        n_truncated=train.n_truncated,
    )
