"""Codes: what the index stores per sequence (see ``codeplan`` for which entries) and how queries meet them.

A code is a fixed number of EK-FAC-whitened rotated-gradient entries, so
⟨code_q, code_z⟩ estimates the influence I(q, z) and a prefix of the code is what stage 1 searches;
optionally followed by each layer's low-rank factors X = U·√Σ, Y = V·√Σ of its whitened factor block, which
stage 2 scores against the query's full block: Σ_r x_rᵀ W_q y_r (the query side is exact).
Training sequences are coded inside the capture: token inputs are projected onto each layer's block at
the forward pass and output gradients at the backward pass, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .capture import capture, device_and_dtype
from .codeplan import FACTOR_BITS, FACTOR_FIELDS, FACTOR_LEVELS, CodePlan, CompressionConfig, LayerPlan
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .factors import Factors, rotated_sequence_gradients


@dataclass
class QueryEmbedding:
    """Queries as each stage sees them: rotated gradients G̃ = Q_Sᵀ G Q_A per layer (for the exact rerank),
    codes, and the codes' norms (for cosine scores)."""

    rotated: dict[str, torch.Tensor]
    codes: np.ndarray  # (Q, code_dim) float32 (no factors: zeros there)
    vectors: np.ndarray  # (Q, stage1_dim) float32: what stage 1 searches with
    norms: np.ndarray  # (Q,) float64, of what stage 2 scores
    blocks: dict[str, np.ndarray]  # per factored layer, (Q, f_out, f_in) whitened factor blocks


class Compressor:
    """Turns sequences into codes: ``encode`` (training rows) and ``embed`` (queries)."""

    def __init__(self, factors: Factors, config: CompressionConfig):
        self.config, self.factors, self.specs = config, factors, factors.specs
        self.plan = CodePlan.of(factors, config)
        self.code_dim = self.plan.code_dim
        self.stage1_dim = min(config.stage1_dim or self.code_dim, self.code_dim)
        self.storage_dtype = getattr(torch, config.dtype)
        self.coded = [s for s in self.specs if self.plan.layers[s.name].used]
        self.factored = {name: lp for name, lp in self.plan.layers.items() if lp.factor_rank}
        # What stage 2 multiplies the query's code by: the entries outside every factor block (those inside
        # are the factors' to score, and counting them twice would skew the estimate).
        self.n_entries = sum(len(lp.entries) for lp in self.plan.layers.values())  # the factors' slots follow them
        self.entry_weight = np.zeros(self.n_entries, np.float32)
        for lp in self.plan.layers.values():
            self.entry_weight[lp.slots[lp.outside].numpy()] = 1
        self._placed: dict[tuple, dict[str, LayerPlan]] = {}

    def _layers(self, device, dtype) -> dict[str, LayerPlan]:
        key = (str(device), dtype)
        if key not in self._placed:
            self._placed[key] = {name: lp.to(device, dtype) for name, lp in self.plan.layers.items()}
        return self._placed[key]

    @staticmethod
    def _code_layer(lp: LayerPlan, a_proj: torch.Tensor, delta: torch.Tensor, out: torch.Tensor, factored: list) -> None:
        """Add one layer's entries to ``out`` (B, code_dim) given its inputs projected onto the entries' block
        and then the factor block (B, T, k_in + f_in); its plan and factors X = U·√S, Y = V·√S (B, r, f) are appended to ``factored``."""
        k_in = lp.proj_a.shape[1]
        Compressor._code_entries(lp, a_proj[..., :k_in], delta, out)
        if lp.factor_rank:
            w = torch.einsum("bto,bti->boi", delta @ lp.factor_proj_s, a_proj[..., k_in:]) * lp.factor_scale
            u, s, vh = torch.linalg.svd(w.to(torch.promote_types(w.dtype, torch.float32)), full_matrices=False)  # LAPACK: the same bits every rebuild
            root = s[:, : lp.factor_rank, None].sqrt()
            factored.append((lp, u[..., : lp.factor_rank].transpose(1, 2) * root, vh[:, : lp.factor_rank] * root))

    @staticmethod
    def _code_entries(lp: LayerPlan, a_proj: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> None:
        if len(lp.entries):
            block = torch.einsum("bto,bti->boi", delta @ lp.proj_s, a_proj).flatten(1)
            out[:, lp.slots] = block[:, lp.entries] * lp.scale

    @staticmethod
    def _projection(lp: LayerPlan) -> torch.Tensor:
        return torch.cat([lp.proj_a, lp.factor_proj_a], 1) if lp.factor_rank else lp.proj_a

    def encode(self, model: nn.Module, data: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> tuple[np.ndarray, np.ndarray]:
        """Codes (storage dtype) and their squared norms (float64, the index's self-influence estimate) of
        every sequence of ``data``, a batch at a time; only uncoded layers' hooks are skipped."""
        device, dtype = device_and_dtype(model)
        plans = self._layers(device, dtype)
        projections = {name: self._projection(lp) for name, lp in plans.items()}
        weight = torch.from_numpy(self.entry_weight).to(device, torch.float64)  # a stored norm: the outside entries, then Σ s_r²
        codes = np.zeros((len(data), self.code_dim), dtype=self.config.dtype)
        norms = np.zeros(len(data), dtype=np.float64)
        for rows in plan_batches(data, token_budget):
            out = torch.zeros(len(rows), self.code_dim, dtype=dtype, device=device)
            factored: list[tuple[LayerPlan, torch.Tensor, torch.Tensor]] = []
            capture(model, self.coded, collate(data, rows).to(device),
                    lambda name, a, delta: self._code_layer(plans[name], a, delta, out, factored),
                    transform=lambda name, a: a @ projections[name])
            block = out.to("cpu", self.storage_dtype).numpy()
            squares = (out[:, : self.n_entries].double().square() * weight).sum(1).cpu().numpy()
            for lp, x, y in factored:  # packed after the cast: the slots hold bits, not values
                block[:, lp.factor_slot : lp.factor_slot + lp.factor_dim] = pack_factors(x.cpu(), y.cpu(), self.config.dtype)
                squares += (x.double().square().sum(-1) * y.double().square().sum(-1)).sum(1).cpu().numpy()  # ‖Σ x_r y_rᵀ‖² = Σ s_r²
            codes[rows] = block
            norms[rows] = squares
        return codes, norms

    def embed(self, model: nn.Module, queries: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> QueryEmbedding:
        """The one way queries enter the index: per-sequence rotated gradients (for the exact rerank) and
        codes, from one capture."""
        device, dtype = device_and_dtype(model)
        plans = self._layers(device, dtype)
        bases = {name: (f.q_a.to(device, dtype), f.q_s.to(device, dtype)) for name, f in self.factors.layers.items()}
        rotated = {s.name: torch.zeros(len(queries), s.d_out, s.d_in, dtype=dtype, device=device) for s in self.specs}
        codes = torch.zeros(len(queries), self.code_dim, dtype=dtype, device=device)
        for rows in plan_batches(queries, token_budget):
            positions = torch.tensor(rows, device=device)
            out = torch.zeros(len(rows), self.code_dim, dtype=dtype, device=device)

            def keep(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
                rotated[name][positions] = rotated_sequence_gradients(a, delta, *bases[name])
                self._code_entries(plans[name], a @ plans[name].proj_a, delta, out)

            capture(model, self.specs, collate(queries, rows).to(device), keep)
            codes[positions] = out
        codes = codes.float().cpu().numpy()
        blocks = {name: (rotated[name][:, lp.factor_rows][:, :, lp.factor_cols].float().cpu() * lp.factor_scale).numpy()
                  for name, lp in self.factored.items()}  # the query's side of the factors: exact, never factored
        squares = (codes[:, : self.n_entries].astype(np.float64) ** 2 * self.entry_weight).sum(1) + sum((b.astype(np.float64) ** 2).sum((1, 2)) for b in blocks.values())
        return QueryEmbedding(rotated, codes, self.stage1_vectors(codes), np.sqrt(squares), blocks)

    def stage1_vectors(self, codes: np.ndarray) -> np.ndarray:
        """What FAISS indexes of a stored code: its first ``stage1_dim`` entries, float32."""
        return np.ascontiguousarray(codes[:, : self.stage1_dim], dtype=np.float32)

    def scores(self, stored: np.ndarray, embedding: QueryEmbedding, queries: list[int] | None = None) -> np.ndarray:
        """Stage-2 scores of (K, code_dim) stored codes for the embedding's ``queries`` (default all):
        ⟨code_q, code_z⟩ over the entries outside the factor blocks, plus Σ_r x_rᵀ W_q y_r over each
        factored layer → (Q, K)."""
        queries = list(range(len(embedding.codes))) if queries is None else queries
        n = self.n_entries
        out = (embedding.codes[queries, :n] * self.entry_weight) @ stored[:, :n].astype(np.float32).T
        for name, lp in self.factored.items():
            x, y = unpack_factors(stored[:, lp.factor_slot : lp.factor_slot + lp.factor_dim], lp.factor_rank,
                                  lp.factor_proj_s.shape[1], lp.factor_proj_a.shape[1])
            for i, q in enumerate(queries):  # Σ_r x_rᵀ W_q y_r as matrix products, not an einsum loop
                out[i] += (y @ embedding.blocks[name][q].T * x).sum((1, 2))
        return out


def pack_factors(x: torch.Tensor, y: torch.Tensor, dtype: str) -> np.ndarray:
    """(B, r, f_out) and (B, r, f_in) factors as storage slots: 2r scales (one per vector: its absmax over
    FACTOR_LEVELS), then every level + FACTOR_LEVELS (0 … 30, 5 bits) packed FACTOR_FIELDS to a slot."""
    x, y = x.double(), y.double()
    scales = [v.abs().amax(-1, keepdim=True) / FACTOR_LEVELS for v in (x, y)]
    levels = torch.cat([torch.round(v / s.clamp_min(1e-300)).clamp(-FACTOR_LEVELS, FACTOR_LEVELS).flatten(1) for v, s in zip((x, y), scales)], 1)
    fields = FACTOR_FIELDS[dtype]
    levels = torch.nn.functional.pad(levels.long() + FACTOR_LEVELS, (0, -levels.shape[1] % fields)).view(len(x), -1, fields)
    bits = (levels << (FACTOR_BITS * torch.arange(fields))).sum(-1).numpy()
    raw = bits.astype(np.uint16 if dtype == "float16" else np.uint32).view(dtype)
    return np.concatenate([torch.cat(scales, 1).squeeze(-1).numpy().astype(dtype), raw], 1)


def unpack_factors(slots: np.ndarray, rank: int, f_out: int, f_in: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``pack_factors`` (to the levels' rounding): float32 (K, r, f_out) and (K, r, f_in)."""
    fields = FACTOR_FIELDS[slots.dtype.name]
    bits = np.ascontiguousarray(slots[:, 2 * rank :]).view(np.uint16 if fields == 3 else np.uint32).astype(np.int64)
    levels = ((bits[..., None] >> (FACTOR_BITS * np.arange(fields))) & ((1 << FACTOR_BITS) - 1)).reshape(len(slots), -1)
    levels = (levels[:, : rank * (f_out + f_in)] - FACTOR_LEVELS).astype(np.float32)
    scales = slots[:, : 2 * rank].astype(np.float32)
    x = levels[:, : rank * f_out].reshape(-1, rank, f_out) * scales[:, :rank, None]
    return x, levels[:, rank * f_out :].reshape(-1, rank, f_in) * scales[:, rank:, None]
