"""Exact EK-FAC influence of training sequences on queries — the ground truth everything else is measured against.

I(q, z) = Σ_layers Σ_t δ_{z,t}ᵀ P_q a_{z,t},  with P_q = H⁻¹ G_q the preconditioned query gradient.
Training gradients are never stored: each batch's token matrices are contracted with every P_q at
once, and the per-token terms are the token-wise influences.
Both gradients are of summed negative log-likelihoods, so I > 0 means up-weighting z raises
log p(completion | prompt).

Query batching (the paper's §3.3): many queries are held at once as rank-r factors of each layer's
P_q (``low_rank``), r·(d_out + d_in) numbers instead of d_out·d_in per query and layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import capture, device_and_dtype, fold_tokens
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .errors import GradIndexError
from .factors import Factors
from .files import atomic_write
from .layers import LayerSpec, head_blocks

# Largest intermediate (in elements) a contraction may form before it is split; ~256 MB of float32.
_MAX_ELEMENTS = 64 * 2**20
# Preconditioned query gradients held at once (each is as large as the tracked layers: 320 MB on a 135M
# model, 22 GB on an 8B one); more queries are scored in several passes over the training data.
QUERY_MEMORY = 2 * 2**30


def query_chunks(n_queries: int, layers: list[LayerSpec], element_size: int = 4, memory: int | None = None) -> list[range]:
    """Groups of queries whose full per-layer gradients fit ``memory`` (default ``QUERY_MEMORY``) together,
    at least one query a group."""
    per_query = 2 * element_size * sum(s.d_out * s.d_in for s in layers)  # raw and preconditioned, briefly both
    size = max(1, (QUERY_MEMORY if memory is None else memory) // max(1, per_query))
    return [range(i, min(i + size, n_queries)) for i in range(0, n_queries, size)]


@dataclass
class ScoreResult:
    """``scores[q, n]``: influence of training sequence n on query q (float32).

    ``per_layer[name][q, n]`` sums over layers to ``scores``; ``per_token[n][q, t]`` is token t's share
    of sequence n's influence and sums over t to ``scores[q, n]``; ``per_head[name][q, n, h]`` splits an
    attention projection's ``per_layer`` by head (:func:`layers.head_blocks`; an o_proj bias is in no head).
    """

    scores: np.ndarray
    per_layer: dict[str, np.ndarray] | None = None
    per_token: list[np.ndarray] | None = None
    per_head: dict[str, np.ndarray] | None = None
    n_truncated: int = 0  # training sequences cut to the maximum length (not saved: a property of the run)

    def save(self, path: str | Path) -> list[Path]:
        """``scores`` as ``path`` (.npy); per-layer and per-token scores beside it as ``<stem>.per_layer.npz``
        and ``<stem>.per_token.npz`` (one array per training row). Returns the files written."""
        path = Path(path)
        arrays = {path: self.scores, _beside(path, "per_layer"): self.per_layer, _beside(path, "per_head"): self.per_head,
                  _beside(path, "per_token"): None if self.per_token is None else {str(i): t for i, t in enumerate(self.per_token)}}
        written = []
        for target, value in arrays.items():
            if value is None:
                continue
            with atomic_write(target) as tmp, open(tmp, "wb") as f:
                if isinstance(value, dict):
                    np.savez(f, **value)
                else:
                    np.save(f, value)
            written.append(target)
        return written

    @classmethod
    def load(cls, path: str | Path) -> "ScoreResult":
        path = Path(path)
        if not path.is_file():
            raise GradIndexError(f"no scores at {path}")
        per_layer, per_token, per_head = (_beside(path, kind) for kind in ("per_layer", "per_token", "per_head"))
        tokens = dict(np.load(per_token)) if per_token.is_file() else None
        return cls(
            scores=np.load(path),
            per_layer=dict(np.load(per_layer)) if per_layer.is_file() else None,
            per_head=dict(np.load(per_head)) if per_head.is_file() else None,
            per_token=[tokens[str(i)] for i in range(len(tokens))] if tokens is not None else None,
        )


def _beside(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.with_suffix('').name}.{kind}.npz")


def sequence_gradients(model: nn.Module, layers: list[LayerSpec], data: TokenizedSet, *, token_budget: int = DEFAULT_TOKEN_BUDGET) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of the summed NLL of the scored tokens, (n, d_out, d_in) per layer."""
    device, dtype = device_and_dtype(model)
    grads = {s.name: torch.zeros(len(data), s.d_out, s.d_in, dtype=dtype, device=device) for s in layers}
    for rows in plan_batches(data, token_budget):
        positions = torch.tensor(rows, device=device)

        def keep(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
            grads[name][positions] = torch.einsum("bto,bti->boi", delta, a)

        capture(model, layers, collate(data, rows).to(device), keep)
    return grads


def query_gradients(
    model: nn.Module,
    factors: Factors,
    queries: TokenizedSet,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    damping: float | None = None,
    damping_scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Preconditioned query gradients P_q = H⁻¹ G_q, (n_queries, d_out, d_in) per layer."""
    grads = sequence_gradients(model, factors.specs, queries, token_budget=token_budget)
    for name in list(grads):  # one layer at a time, so raw and preconditioned gradients are never all alive
        grads[name] = factors.precondition(name, grads[name], damping, damping_scale)
    return grads


@dataclass
class LowRankQuery:
    """P_q ≈ left @ rightᵀ per query: the top-r singular triplets, left = U·diag(σ) (Q, d_out, r), right = V (Q, d_in, r)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.left.shape[0], self.left.shape[1], self.right.shape[1]

    def full(self, queries: slice = slice(None)) -> torch.Tensor:
        return self.left[queries] @ self.right[queries].transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.left.numel() * self.left.element_size() + self.right.numel() * self.right.element_size()


def low_rank(p: dict[str, torch.Tensor], rank: int) -> dict[str, LowRankQuery]:
    """Rank-``rank`` truncated SVD of every query's preconditioned gradient, per layer (exact when the rank
    reaches min(d_out, d_in))."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise GradIndexError(f"query rank must be a positive integer, got {rank!r}")
    out = {}
    for name, x in p.items():
        u, sigma, vh = torch.linalg.svd(x, full_matrices=False)
        r = min(rank, sigma.shape[-1])
        out[name] = LowRankQuery(u[..., :r] * sigma[..., None, :r], vh[..., :r, :].transpose(1, 2).contiguous())
    return out


def query_bytes(p: dict[str, torch.Tensor | LowRankQuery]) -> int:
    """Memory the held query gradients take."""
    return sum(x.nbytes if isinstance(x, LowRankQuery) else x.numel() * x.element_size() for x in p.values())


def contract(p: torch.Tensor | LowRankQuery, a: torch.Tensor, delta: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Σ_t δ_tᵀ P_q a_t for every query q and sequence b: (Q, B), or (Q, B, T) per token.

    Per token (or for a single query) it goes through the token matrices; otherwise it forms each
    sequence's gradient once and reuses it for every query, which is cheaper whenever Q > 1.
    """
    n_q, d_out, d_in = p.shape
    n_b, n_t = a.shape[:2]
    if isinstance(p, LowRankQuery):
        return _contract_low_rank(p, a, delta, per_token)
    if per_token or n_q * n_t <= n_q + n_t:
        step = max(1, _MAX_ELEMENTS // max(1, n_b * n_t * d_out))
        parts = [torch.einsum("bti,qoi,bto->qbt", a, p[i : i + step], delta) for i in range(0, n_q, step)]
        out = torch.cat(parts)
        return out if per_token else out.sum(-1)
    step = max(1, _MAX_ELEMENTS // (d_out * d_in))
    flat = p.reshape(n_q, -1)
    parts = [flat @ torch.einsum("bto,bti->boi", delta[i : i + step], a[i : i + step]).reshape(-1, d_out * d_in).T for i in range(0, n_b, step)]
    return torch.cat(parts, dim=1)


def _contract_low_rank(p: LowRankQuery, a: torch.Tensor, delta: torch.Tensor, per_token: bool) -> torch.Tensor:
    """Σ_t (δ_tᵀ left)·(a_tᵀ right) through the factors, or, when that costs more (many queries, long
    sequences), through each sequence's gradient against P rebuilt a chunk of queries at a time."""
    n_q, d_out, d_in = p.shape
    n_b, n_t = a.shape[:2]
    r = p.left.shape[2]
    factored = n_q * n_t * r * (d_out + d_in)
    rebuilt = n_t * d_out * d_in + n_q * d_out * d_in * (1 + r / n_b)
    if per_token or factored <= rebuilt:
        step = max(1, _MAX_ELEMENTS // max(1, n_b * n_t * r))
        parts = [
            (torch.einsum("bto,qor->qbtr", delta, p.left[i : i + step]) * torch.einsum("bti,qir->qbtr", a, p.right[i : i + step])).sum(-1)
            for i in range(0, n_q, step)
        ]
        out = torch.cat(parts)
        return out if per_token else out.sum(-1)
    grads = torch.einsum("bto,bti->boi", delta, a).reshape(n_b, -1)
    step = max(1, _MAX_ELEMENTS // (d_out * d_in))
    return torch.cat([p.full(slice(i, i + step)).reshape(-1, d_out * d_in) @ grads.T for i in range(0, n_q, step)])


def compute_scores(
    model: nn.Module,
    factors: Factors,
    train: TokenizedSet,
    queries: TokenizedSet,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    damping: float | None = None,
    damping_scale: float | None = None,
    per_layer: bool = False,
    per_token: bool = False,
    per_head: bool = False,
    query_rank: int | None = None,
    progress: bool = True,
) -> ScoreResult:
    """EK-FAC influence of every training sequence on every query, exact, or with each query's preconditioned
    gradient cut to rank ``query_rank``. All queries share one pass over ``train`` while their gradients fit
    ``QUERY_MEMORY``; beyond that, one pass per group (``query_chunks``), so memory does not grow with them."""
    parts = []
    for group in query_chunks(len(queries), factors.specs, device_and_dtype(model)[1].itemsize):
        p = query_gradients(model, factors, queries.subset(group), token_budget=token_budget, damping=damping, damping_scale=damping_scale)
        if query_rank is not None:
            p = low_rank(p, query_rank)
        parts.append(score_preconditioned(model, factors.specs, p, train, token_budget=token_budget, per_layer=per_layer,
                                          per_token=per_token, per_head=per_head, progress=progress))
        del p
    if len(parts) == 1:
        return parts[0]
    return ScoreResult(
        scores=np.concatenate([r.scores for r in parts]),
        per_layer={k: np.concatenate([r.per_layer[k] for r in parts]) for k in parts[0].per_layer} if per_layer else None,
        per_token=[np.concatenate([r.per_token[i] for r in parts]) for i in range(len(train))] if per_token else None,
        per_head={k: np.concatenate([r.per_head[k] for r in parts]) for k in parts[0].per_head} if per_head else None,
        n_truncated=train.n_truncated,
    )


def score_preconditioned(
    model: nn.Module,
    layers: list[LayerSpec],
    p: dict[str, torch.Tensor | LowRankQuery],
    train: TokenizedSet,
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    per_layer: bool = False,
    per_token: bool = False,
    per_head: bool = False,
    progress: bool = True,
) -> ScoreResult:
    """Exact influence of every sequence of ``train`` given preconditioned query gradients P_q (Q, d_out, d_in)."""
    device, dtype = device_and_dtype(model)
    n_q, n = next(iter(p.values())).shape[0], len(train)
    layer_scores = {s.name: torch.zeros(n_q, n, dtype=torch.float64) for s in layers}
    heads = {}  # layer → (axis, heads, rows or columns per head)
    for s in layers if per_head else []:
        if (blocks := head_blocks(model, s)) is not None:
            axis, h = blocks
            heads[s.name] = (axis, h, (s.d_out if axis == 0 else s.d_in - s.has_bias) // h)
    if any(isinstance(p[name], LowRankQuery) for name in heads):
        raise GradIndexError("per-head scores need exact query gradients (no --query-rank)")
    head_scores = {name: torch.zeros(n_q, n, h, dtype=torch.float64) for name, (_, h, _) in heads.items()}
    token_scores: list[np.ndarray | None] = [np.zeros((n_q, len(ids)), np.float32) for ids in train.input_ids] if per_token else []
    for rows in tqdm(plan_batches(train, token_budget), desc="scoring", disable=not progress, unit="batch"):
        tokens_total: list[torch.Tensor] = []  # a running sum over layers, (Q, B, T)

        def score(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
            s = contract(p[name], a, delta, per_token=per_token)
            if per_token:
                s = fold_tokens(s, width)
                tokens_total[:] = [s.float() + tokens_total[0]] if tokens_total else [s.float()]
                s = s.sum(-1)
            layer_scores[name][:, rows] = s.double().cpu()
            if name in heads:  # the layer's score, summed over each head's block of P_q and of the gradient
                axis, h, size = heads[name]
                for k in range(h):
                    block = slice(k * size, (k + 1) * size)
                    head = contract(p[name][:, block], a, delta[..., block]) if axis == 0 else contract(p[name][:, :, block], a[..., block], delta)
                    head_scores[name][:, rows, k] = head.double().cpu()

        batch = collate(train, rows).to(device)
        width = batch.input_ids.shape[1]
        capture(model, layers, batch, score)
        if per_token:
            totals = tokens_total[0].cpu().numpy()
            for b, r in enumerate(rows):
                token_scores[r] = totals[:, b, : len(train.input_ids[r])]
    total = sum(layer_scores.values())
    return ScoreResult(
        scores=total.float().numpy(),
        per_layer={k: v.float().numpy() for k, v in layer_scores.items()} if per_layer else None,
        per_token=token_scores if per_token else None,
        per_head={k: v.float().numpy() for k, v in head_scores.items()} if per_head else None,
        n_truncated=train.n_truncated,
    )
