"""Compressed, EK-FAC-whitened training gradients: what the index stores per sequence.

Influence is a plain inner product of whitened gradients (see ``factors``):
  I(q, z) = Σ_layers ⟨W(G_q), W(G_z)⟩,   W(G) = G̃ / sqrt(Λ + λ),   G̃ = Q_Sᵀ G Q_A.
Two compressions of W(G_z) are stored, one per cascade stage:
- stage 1, a fixed-length vector whose inner product with the query's approximates influence, for
  FAISS: the entries of largest Λ ("topl") or a CountSketch of all entries ("sketch"). It is whitened
  with a heavier damping than the exact scorer's: that lowers the effective dimension (fewer
  directions to preserve) while keeping the top of the ranking (design notes).
- stage 2, codes: a rank-r factorisation U Vᵀ of each layer's W(G_z) (randomised SVD), rescored against
  the query's full W(G_q) for the candidates only.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .capture import capture, device_and_dtype
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .errors import GradIndexError
from .factors import Factors, rotated_sequence_gradients
from .files import from_dict
from .scores import sequence_gradients

STAGE1_SCHEMES = ("sketch", "topl")
# How CountSketch buckets and signs are drawn. "splitmix64-v1" is a fixed hash of (seed, layer, entry) that
# no library upgrade can change; "torch-generator" is what indexes written before it used (torch's seeded
# RNG), readable only under the torch release that built them. A new hash gets a new name, never an old one.
SKETCH_HASH = "splitmix64-v1"
LEGACY_SKETCH_HASH = "torch-generator"
SKETCH_HASHES = (SKETCH_HASH, LEGACY_SKETCH_HASH)


@dataclass
class CompressionConfig:
    """How each training gradient is compressed; saved in the index manifest."""

    stage1: str = "sketch"  # "sketch" (CountSketch of all entries) or "topl" (entries of largest Λ)
    stage1_dim: int = 1024  # per layer: sketch buckets, or number of top-Λ entries kept
    stage1_damping_scale: float = 1.0  # λ₁ = this × mean Λ: heavier than the exact default 0.1
    stage2_rank: int = 8  # rank of each layer's stage-2 code
    stage2_damping_scale: float | None = None  # None: the factors' own default (what exact scoring uses)
    power_iterations: int = 0  # randomised SVD; one more pass costs 20 % of build speed for no measured recall
    seed: int = 0
    dtype: str = "float16"  # storage dtype of vectors and codes
    sketch_hash: str = SKETCH_HASH  # how the sketch's buckets and signs are derived (see SKETCH_HASHES)

    def __post_init__(self):
        if self.stage1 not in STAGE1_SCHEMES:
            raise GradIndexError(f"stage-1 scheme must be one of {', '.join(STAGE1_SCHEMES)}, not {self.stage1!r}")
        if self.sketch_hash not in SKETCH_HASHES:
            raise GradIndexError(f"stage-1 sketch hash {self.sketch_hash!r} is unknown to this gradindex (it knows "
                                 f"{', '.join(SKETCH_HASHES)}); upgrade gradindex to read this index")
        if self.stage1_dim <= 0 or self.stage2_rank <= 0:
            raise GradIndexError("stage-1 dimension and stage-2 rank must be positive")
        if self.dtype not in ("float16", "float32"):
            raise GradIndexError(f"storage dtype must be float16 or float32, not {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        """Settings as saved; those written before the sketch hash was recorded used torch's generator."""
        data = {"sketch_hash": LEGACY_SKETCH_HASH, **data} if isinstance(data, dict) else data
        return from_dict(cls, data, renamed={"rank": "stage2_rank"}, where="compression settings")


def sketch_hash(layer: str, size: int, dim: int, seed: int = 0, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """CountSketch buckets (int64 in [0, dim)) and signs (±1 float32) of a layer's ``size`` entries, version
    "splitmix64-v1": entry i takes the i-th output of splitmix64 seeded with a BLAKE2b hash of (seed, layer);
    its high 32 bits pick the bucket (multiply-shift), its lowest bit the sign."""
    key = np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{layer}".encode(), digest_size=8).digest(), "little"))
    buckets, signs = np.empty(size, np.int64), np.empty(size, np.float32)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 intends
        for start in range(0, size, chunk):
            z = key + (np.arange(start, min(start + chunk, size), dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z ^= z >> np.uint64(31)
            buckets[start : start + len(z)] = ((z >> np.uint64(32)) * np.uint64(dim)) >> np.uint64(32)
            signs[start : start + len(z)] = (z & np.uint64(1)).astype(np.float32) * 2 - 1
    return torch.from_numpy(buckets), torch.from_numpy(signs)


@dataclass
class QueryEmbedding:
    """Queries as each stage sees them: raw gradients G (for the exact rerank), stage-1 vectors, the
    stage-2-whitened W(G) per layer, and the norms |W(G)| (for cosine scores)."""

    gradients: dict[str, torch.Tensor]
    vectors: np.ndarray  # (Q, vector_dim) float32
    whitened: dict[str, torch.Tensor]
    norms: np.ndarray  # (Q,) float64


class Compressor:
    """Turns rotated gradients G̃ (…, d_out, d_in) per layer into stage-1 vectors and stage-2 codes."""

    def __init__(self, factors: Factors, config: CompressionConfig):
        self.config = config
        self.factors = factors
        self.specs = factors.specs
        self._inv1, self._inv2, self._select = {}, {}, {}
        generator = torch.Generator().manual_seed(config.seed)
        for spec in self.specs:
            lam = factors.layers[spec.name].lam.double()
            lam1 = config.stage1_damping_scale * float(lam.mean())
            lam2 = factors.damping(spec.name, damping_scale=config.stage2_damping_scale)
            self._inv1[spec.name] = (lam + lam1).rsqrt().float().flatten()
            self._inv2[spec.name] = (lam + lam2).rsqrt().float()
            size = spec.d_out * spec.d_in
            dim = min(config.stage1_dim, size)
            if config.stage1 == "topl":
                self._select[spec.name] = torch.topk(lam.flatten(), dim).indices.sort().values
                continue
            if config.sketch_hash == SKETCH_HASH:
                self._select[spec.name], sign = sketch_hash(spec.name, size, dim, config.seed)
            else:
                self._select[spec.name] = torch.randint(0, dim, (size,), generator=generator)
                sign = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
            self._inv1[spec.name] = self._inv1[spec.name] * sign  # the sketch's signs ride on the whitening
        self.layer_dims = {s.name: min(config.stage1_dim, s.d_out * s.d_in) for s in self.specs}
        self.vector_dim = sum(self.layer_dims.values())
        self.component_dim = sum(s.d_out + s.d_in for s in self.specs)  # one rank-1 term of every layer
        self.code_dim = config.stage2_rank * self.component_dim
        self.storage_dtype = getattr(torch, config.dtype)

    def _to(self, table: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        t = table[name]
        if t.device != like.device:
            t = table[name] = t.to(like.device)
        return t

    def stage1(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """(B, d_out, d_in) → (B, layer_dim) float32."""
        w = rotated.float().flatten(1) * self._to(self._inv1, name, rotated)
        select = self._to(self._select, name, rotated)
        if self.config.stage1 == "topl":
            return w[:, select]
        out = torch.zeros(w.shape[0], self.layer_dims[name], device=w.device)
        return out.index_add_(1, select, w)

    def whiten2(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        """W(G) with the stage-2 damping, (B, d_out, d_in) float32."""
        return rotated.float() * self._to(self._inv2, name, rotated)

    def code(self, w: torch.Tensor) -> torch.Tensor:
        """Rank-r codes of each (d_out, d_in) matrix: (B, r, d_out + d_in), component j = [u_j | v_j]."""
        u, v = randomized_svd(w, self.config.stage2_rank, self.config.power_iterations, seed=self.config.seed)
        return torch.cat([u.mT, v.mT], dim=2)

    def compress(self, rotated: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage-1 vectors (B, vector_dim), stage-2 codes (B, code_dim) and exact self-influence (B,)
        under the stage-2 damping, for a batch of rotated gradients.

        Codes are stored component-major (every layer's first rank-1 term, then every layer's second…),
        largest first, so a row's prefix is the best lower-rank approximation: the rank is a query-time knob
        and reading a prefix touches only that part of the row.
        """
        vectors, codes, self_influence = [], [], 0
        for spec in self.specs:
            g = rotated[spec.name]
            vectors.append(self.stage1(spec.name, g))
            w = self.whiten2(spec.name, g)
            self_influence = self_influence + torch.linalg.vector_norm(w, dim=(1, 2)).double().square()
            codes.append(self.code(w))
        return torch.cat(vectors, 1), torch.cat(codes, 2).flatten(1), self_influence

    def encode(self, model: nn.Module, data: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the index stores for every sequence of ``data``: stage-1 vectors and stage-2 codes (storage
        dtype) and self-influence (float64), computed a batch at a time."""
        device, dtype = device_and_dtype(model)
        vectors = torch.zeros(len(data), self.vector_dim, dtype=self.storage_dtype)
        codes = torch.zeros(len(data), self.code_dim, dtype=self.storage_dtype)
        self_influence = torch.zeros(len(data), dtype=torch.float64)
        bases = {name: (f.q_a.to(device, dtype), f.q_s.to(device, dtype)) for name, f in self.factors.layers.items()}
        for rows in plan_batches(data, token_budget):
            rotated = {name: rotated_sequence_gradients(c.a.to(dtype), c.delta.to(dtype), *bases[name])
                       for name, c in capture(model, self.specs, collate(data, rows).to(device)).items()}
            v, c, s = self.compress(rotated)
            positions = torch.tensor(rows)
            vectors[positions] = v.to("cpu", self.storage_dtype)
            codes[positions] = c.to("cpu", self.storage_dtype)
            self_influence[positions] = s.cpu()
        return vectors.numpy(), codes.numpy(), self_influence.numpy()

    def query_vectors(self, rotated: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query side: stage-1 vectors (Q, vector_dim) and full stage-2-whitened W per layer."""
        vectors = torch.cat([self.stage1(s.name, rotated[s.name]) for s in self.specs], 1)
        return vectors, {s.name: self.whiten2(s.name, rotated[s.name]) for s in self.specs}

    def embed(self, model: nn.Module, queries: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> QueryEmbedding:
        """The one way queries enter the index: gradient → rotation → stage-1 vector and whitened W."""
        gradients = sequence_gradients(model, self.specs, queries, token_budget=token_budget)
        vectors, whitened = self.query_vectors({name: self.factors.rotate(name, g).float() for name, g in gradients.items()})
        norms = torch.sqrt(sum(w.double().square().sum((1, 2)) for w in whitened.values())).numpy()
        return QueryEmbedding(gradients, vectors.cpu().numpy(), whitened, norms)

    def stage2_scores(self, codes: torch.Tensor, whitened: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_layers ⟨W_q, U Vᵀ⟩ for stored codes (K, r'·component_dim), any prefix rank r' ≤ r, and the
        queries' W: (Q, K) float32."""
        codes = codes.float().view(len(codes), -1, self.component_dim)
        total, offset = 0, 0
        for spec in self.specs:
            u = codes[:, :, offset : offset + spec.d_out]
            v = codes[:, :, offset + spec.d_out : offset + spec.d_out + spec.d_in]
            offset += spec.d_out + spec.d_in
            w = whitened[spec.name].to(codes.device)  # (Q, d_out, d_in)
            # ⟨W_q, U Vᵀ⟩ = Σ_r u_rᵀ W_q v_r: one (K·r, d_out) × (d_out, d_in) product per query.
            uw = torch.einsum("kro,qoi->qkri", u, w)
            total = total + (uw * v).sum((2, 3))
        return total


def randomized_svd(w: torch.Tensor, rank: int, power_iterations: int = 1, oversample: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched rank-``rank`` factors (L, R) with L Rᵀ ≈ each (B, m, n) matrix, Halko et al. 2011.

    torch.svd_lowrank does the same but is ~2× slower on stacks of small matrices; a full SVD is ~5×.
    """
    transpose = w.shape[-2] < w.shape[-1]
    if transpose:
        w = w.mT
    n = w.shape[-1]
    k = min(rank + oversample, n)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=generator, device=w.device, dtype=w.dtype)
    y = w @ omega
    for _ in range(power_iterations):
        y = w @ (w.mT @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q
    small = q.mT @ w  # (k, n): W ≈ Q · small
    # The top singular vectors of `small` from the eigenvectors of its k × k Gram matrix: batched eigh of
    # tiny matrices is several times faster than batched SVD, and the discarded tail is what loses precision.
    _, vectors = torch.linalg.eigh(small @ small.mT)
    r = min(rank, k)
    top = vectors.flip(-1)[..., :r]
    top = top * torch.sign(top.sum(-2, keepdim=True) + 1e-30)  # eigenvector signs are arbitrary: fix them
    left = q @ top  # orthonormal columns
    right = small.mT @ top  # V·diag(s)
    if r < rank:  # matrices smaller than the rank: pad with zero factors to keep a fixed width
        left = torch.nn.functional.pad(left, (0, rank - r))
        right = torch.nn.functional.pad(right, (0, rank - r))
    return (right, left) if transpose else (left, right)
