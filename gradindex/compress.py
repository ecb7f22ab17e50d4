"""Codes: what the index stores per sequence (see ``codeplan`` for which entries) and how queries meet them.

A code is a fixed number of EK-FAC-whitened rotated-gradient entries, so
⟨code_q, code_z⟩ estimates the influence I(q, z) and a prefix of the code is what stage 1 searches.
Training sequences are coded inside the capture: token inputs are projected onto each layer's block at
the forward pass and output gradients at the backward pass, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .capture import capture, device_and_dtype
from .codeplan import CodePlan, CompressionConfig, LayerPlan
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .factors import Factors, rotated_sequence_gradients


@dataclass
class QueryEmbedding:
    """Queries as each stage sees them: rotated gradients G̃ = Q_Sᵀ G Q_A per layer (for the exact rerank),
    codes, and the codes' norms (for cosine scores)."""

    rotated: dict[str, torch.Tensor]
    codes: np.ndarray  # (Q, code_dim) float32
    vectors: np.ndarray  # (Q, stage1_dim) float32: what stage 1 searches with
    norms: np.ndarray  # (Q,) float64


class Compressor:
    """Turns sequences into codes: ``encode`` (training rows) and ``embed`` (queries)."""

    def __init__(self, factors: Factors, config: CompressionConfig):
        self.config, self.factors, self.specs = config, factors, factors.specs
        self.plan = CodePlan.of(factors, config)
        self.code_dim = self.plan.code_dim
        self.stage1_dim = min(config.stage1_dim or self.code_dim, self.code_dim)
        self.storage_dtype = getattr(torch, config.dtype)
        self.coded = [s for s in self.specs if self.plan.layers[s.name].used]
        self._placed: dict[tuple, dict[str, LayerPlan]] = {}

    def _layers(self, device, dtype) -> dict[str, LayerPlan]:
        key = (str(device), dtype)
        if key not in self._placed:
            self._placed[key] = {name: lp.to(device, dtype) for name, lp in self.plan.layers.items()}
        return self._placed[key]

    @staticmethod
    def _code_layer(lp: LayerPlan, a_proj: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> None:
        """Add one layer's entries to ``out`` (B, code_dim) given its projected inputs (B, T, k_in)."""
        block = torch.einsum("bto,bti->boi", delta @ lp.proj_s, a_proj).flatten(1)
        out[:, lp.slots] = block[:, lp.entries] * lp.scale

    def encode(self, model: nn.Module, data: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> tuple[np.ndarray, np.ndarray]:
        """Codes (storage dtype) and their squared norms (float64, the index's self-influence estimate) of
        every sequence of ``data``, a batch at a time; only uncoded layers' hooks are skipped."""
        device, dtype = device_and_dtype(model)
        plans = self._layers(device, dtype)
        codes = torch.zeros(len(data), self.code_dim, dtype=self.storage_dtype)
        norms = torch.zeros(len(data), dtype=torch.float64)
        for rows in plan_batches(data, token_budget):
            out = torch.zeros(len(rows), self.code_dim, dtype=dtype, device=device)
            capture(model, self.coded, collate(data, rows).to(device),
                    lambda name, a, delta: self._code_layer(plans[name], a, delta, out),
                    transform=lambda name, a: a @ plans[name].proj_a)
            positions = torch.tensor(rows)
            codes[positions] = out.to("cpu", self.storage_dtype)
            norms[positions] = out.double().square().sum(1).cpu()
        return codes.numpy(), norms.numpy()

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
                if plans[name].used:
                    self._code_layer(plans[name], a @ plans[name].proj_a, delta, out)

            capture(model, self.specs, collate(queries, rows).to(device), keep)
            codes[positions] = out
        codes = codes.float().cpu().numpy()
        return QueryEmbedding(rotated, codes, self.stage1_vectors(codes), np.linalg.norm(codes.astype(np.float64), axis=1))

    def stage1_vectors(self, codes: np.ndarray) -> np.ndarray:
        """What FAISS indexes of a stored code: its first ``stage1_dim`` entries, float32."""
        return np.ascontiguousarray(codes[:, : self.stage1_dim], dtype=np.float32)

    @staticmethod
    def scores(stored: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Stage-2 scores ⟨code_q, code_z⟩: (K, code_dim) stored codes and (Q, code_dim) query codes → (Q, K)."""
        return queries.astype(np.float32) @ stored.astype(np.float32).T
