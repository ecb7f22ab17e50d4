"""The code plan: which eigen-entries of which layer each sequence's code keeps, from the fitted Λ alone.

Entry (i, j) of a layer's whitened rotated gradient W = G̃ / sqrt(Λ + λ) has variance u = Λ/(Λ + λ) ≤ 1
(Λ is its mean square) and real models' Λ is heavy-tailed, so a few entries carry most of every score.
Per layer, a block: the eigenvector rows of S and columns of A that hold the layer's share of the
``code_dim`` largest u of all layers, cut to what costs at most ``block_cost`` × the layer's forward flops to
project onto. Over all layers' blocks together, the ``code_dim`` entries of largest u make the code,
largest first (a prefix is the best shorter code).
For random pairs that is the least-error linear code of its size (the coordinates are uncorrelated with
variances u, so this is PCA); a CountSketch of more entries into the same slots always predicts more error
(Σ_sketched u)²/slots than the truncation it replaces, so there is none. Each layer's share follows from Λ.
With ``factor_share`` > 0, that share of the code's numbers holds instead each layer's **low-rank factors**:
the rank-r SVD of the sequence's whitened gradient inside the layer's factor block (the ``k`` eigen-rows of S
and columns of A of most Λ/(Λ + λ), one ``k`` for all layers, as large as the share affords up to
``factor_block``). Stage 2 scores them against the query's full block (the query is never compressed), and
the entries inside a factor block are left to the factors there, so nothing is counted twice. Stage 1
searches the entries only.
Measured on SmolLM2-135M at 64 KiB (``benchmarks/bench_code_schemes.py``, README): CountSketches of the full
whitened gradient, LoGra-style Kronecker projections, half-and-half hybrids, heavier code damping and entries
chosen by the training data's own energy all rank worse than this truncation.
"""


from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import GradIndexError
from .factors import Factors
from .files import from_dict

DEFAULT_BUDGET = 64 * 1024
STORAGE_DTYPES = ("float16", "float32")
# Factor values are stored as 5-bit levels (±15 steps of a per-vector scale; 4 bits measured as good as float16
# on SmolLM2), packed 3 to a float16 slot and 6 to a float32 one. The packed fields leave the sign bit and the
# top exponent bit clear, so every packed slot is a finite number whose bits survive any copy of the codes.
FACTOR_LEVELS, FACTOR_BITS = 15, 5
FACTOR_FIELDS = {"float16": 3, "float32": 6}


def factor_slots(rank: int, f_out: int, f_in: int, dtype: str) -> int:
    """Slots a layer's factors take: two scales per rank, then the packed levels of U·√S and V·√S."""
    return 2 * rank + -(-rank * (f_out + f_in) // FACTOR_FIELDS[dtype]) if rank else 0


def stage1_bytes(dim: int) -> int:
    """Bytes of one stage-1 FAISS code: RaBitQ's bit per dimension, after the Hadamard rotation pads the
    dimension to a power of two, and its two floats."""
    return (1 << max(0, dim - 1).bit_length()) // 8 + 8 if dim else 8


@dataclass
class CompressionConfig:
    """How each training gradient is compressed; saved in the index manifest."""

    budget: int = DEFAULT_BUDGET  # bytes per sequence: the code plus its stage-1 FAISS code
    stage1_dim: int | None = None  # leading code entries stage 1 searches; None: the whole code
    damping_scale: float | None = None  # whitening of the code; None: the factors' own (what exact scoring uses)
    block_cost: float = 2.0  # a layer's projected block costs at most this × its forward flops
    dtype: str = "float16"  # storage dtype of the codes
    seed: int = 0  # of the rows the FAISS index is trained on
    factor_share: float = 0.0  # share of the code's numbers given to per-layer low-rank factors (stage 2); 0: entries only
    factor_block: int = 128  # the largest side of a layer's factor block

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise GradIndexError(f"storage dtype must be float16 or float32, not {self.dtype!r}")
        for name in ("budget", "stage1_dim"):
            value = getattr(self, name)
            if name == "stage1_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GradIndexError(f"{name} must be a positive integer, not {value!r}")
        if not (isinstance(self.block_cost, (int, float)) and math.isfinite(self.block_cost) and self.block_cost > 0):
            raise GradIndexError(f"block_cost must be a positive number, not {self.block_cost!r}")
        if self.damping_scale is not None and not (math.isfinite(self.damping_scale) and self.damping_scale > 0):
            raise GradIndexError(f"damping scale must be a positive number, not {self.damping_scale!r}")
        if not (isinstance(self.factor_share, (int, float)) and 0 <= self.factor_share < 1):
            raise GradIndexError(f"factor share must be a number in [0, 1), not {self.factor_share!r}")
        if isinstance(self.factor_block, bool) or not isinstance(self.factor_block, int) or self.factor_block <= 0:
            raise GradIndexError(f"factor_block must be a positive integer, not {self.factor_block!r}")
        if self.factor_share and self.stage1_dim is None:
            self.stage1_dim = max(1, self._entries(None))  # FAISS searches a vector: the entries, never the factors
        if self.entry_dim < 1:
            raise GradIndexError(f"a budget of {self.budget} bytes does not hold a code and its stage-1 code; raise --budget"
                                 + (" or lower --stage1-dim" if self.stage1_dim else ""))

    @property
    def factor_dim(self) -> int:
        """Numbers per code the budget gives the low-rank factors (the plan may use fewer)."""
        return int(self.factor_share * self.budget / np.dtype(self.dtype).itemsize)

    @property
    def entry_dim(self) -> int:
        """Eigen-entries per code the budget pays for (before it is cut to what the model has)."""
        return self._entries(self.stage1_dim)

    @property
    def code_dim(self) -> int:
        """Numbers per code: its entries, then its factors."""
        return self.entry_dim + self.factor_dim

    def _entries(self, stage1_dim: int | None) -> int:
        itemsize = np.dtype(self.dtype).itemsize
        budget = self.budget - self.factor_dim * itemsize
        if stage1_dim is None:  # the stage-1 code spans the entries: a bit per (padded) entry more
            dim = int((budget - 8) // (itemsize + 1 / 8))
            return max(0, min(dim, (budget - stage1_bytes(dim)) // itemsize))
        return max(0, (budget - stage1_bytes(stage1_dim)) // itemsize)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        return from_dict(cls, data, where="compression settings")


@dataclass
class LayerPlan:
    """One layer's part of the code: its block (eigenvector columns of S and of A to project onto), and
    which entries of the block go to which slots of the code, whitened by how much."""

    rows: torch.Tensor  # (k_out,) which eigenvectors of S …
    cols: torch.Tensor  # (k_in,) … and of A the block spans
    proj_s: torch.Tensor  # (d_out, k_out) those columns of Q_S
    proj_a: torch.Tensor  # (d_in, k_in) those columns of Q_A
    entries: torch.Tensor  # positions in the flattened (k_out, k_in) block that the code keeps …
    slots: torch.Tensor  # … their slots in the code …
    scale: torch.Tensor  # … and 1/sqrt(Λ + λ) of each
    outside: torch.Tensor  # … and whether it lies outside the factor block (stage 2 scores those entries itself)
    factor_rows: torch.Tensor  # (f_out,) which eigenvectors of S …
    factor_cols: torch.Tensor  # (f_in,) … and of A the factor block spans (none: no factors)
    factor_proj_s: torch.Tensor  # (d_out, f_out) those columns of Q_S …
    factor_proj_a: torch.Tensor  # (d_in, f_in) … and of Q_A (no columns: no factors)
    factor_scale: torch.Tensor  # (f_out, f_in) 1/sqrt(Λ + λ) over the factor block
    factor_rank: int = 0
    factor_slot: int = 0  # where the factors' scales, then their packed levels, start in the code
    factor_dtype: str = "float16"  # the storage dtype they are packed into

    @property
    def used(self) -> bool:
        return len(self.entries) > 0 or self.factor_rank > 0

    @property
    def factor_dim(self) -> int:
        return factor_slots(self.factor_rank, self.factor_proj_s.shape[1], self.factor_proj_a.shape[1], self.factor_dtype)

    def to(self, device, dtype) -> "LayerPlan":
        moved = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v for k, v in asdict(self).items()}
        return LayerPlan(**moved)


@dataclass
class CodePlan:
    layers: dict[str, LayerPlan]
    code_dim: int
    captured: float  # predicted fraction of the score variance of random pairs the code keeps: Σ_kept u² / Σ u²
    shares: dict[str, int]  # entries each layer contributes

    @classmethod
    def of(cls, factors: Factors, config: CompressionConfig) -> "CodePlan":
        variances = {}
        for spec in factors.specs:
            lam = factors.layers[spec.name].lam.double()
            damping = factors.damping(spec.name, damping_scale=config.damping_scale)
            variances[spec.name] = (lam, damping, lam / (lam + damping))
        total = sum(float(u.square().sum()) for _, _, u in variances.values())
        # The entries the code would keep if any block were affordable: the code_dim largest u of all layers.
        n_entries = config.entry_dim
        tops = torch.cat([torch.topk(u.flatten(), min(n_entries, u.numel())).values for _, _, u in variances.values()])
        cut = float(torch.topk(tops, min(n_entries, len(tops))).values[-1])
        blocks, values = {}, []
        for spec in factors.specs:
            lam, damping, u = variances[spec.name]
            rows, cols = _block(u, u >= cut, config.block_cost)
            blocks[spec.name] = (rows, cols, (lam[rows][:, cols].flatten() + damping).rsqrt())
            values.append(u[rows][:, cols].flatten())
        owner = torch.cat([torch.full((len(v),), i) for i, v in enumerate(values)])
        position = torch.cat([torch.arange(len(v)) for v in values])
        u = torch.cat(values)
        kept = torch.argsort(u, descending=True, stable=True)[:n_entries]  # slot s holds entry kept[s]
        shapes = [(spec.d_out, spec.d_in) for spec in factors.specs]
        side, rank = _factor_size(shapes, config.factor_dim, config.factor_block, config.dtype)
        if config.factor_share and not rank:
            raise GradIndexError(f"a factor share of {config.factor_share:g} of {config.budget} bytes does not hold rank-1 factors for "
                                 f"{len(shapes)} layers; raise --budget or --factor-share, or set --factor-share 0")
        layers, shares, slot = {}, {}, len(kept)
        for i, (name, (rows, cols, scale)) in enumerate(blocks.items()):
            f, (_, _, u_layer) = factors.layers[name], variances[name]
            slots = (owner[kept] == i).nonzero().squeeze(-1)
            entries = position[kept[slots]]
            f_rows = torch.argsort(u_layer.sum(1), descending=True, stable=True)[: min(side, shapes[i][0]) if rank else 0].sort().values
            f_cols = torch.argsort(u_layer.sum(0), descending=True, stable=True)[: min(side, shapes[i][1]) if rank else 0].sort().values
            inside = torch.isin(rows[entries // len(cols)], f_rows) & torch.isin(cols[entries % len(cols)], f_cols)
            lam, damping, _ = variances[name]
            layers[name] = LayerPlan(rows=rows, cols=cols, proj_s=f.q_s[:, rows].float(), proj_a=f.q_a[:, cols].float(), entries=entries, slots=slots,
                                     scale=scale[entries].float(), outside=~inside, factor_rows=f_rows, factor_cols=f_cols, factor_proj_s=f.q_s[:, f_rows].float(),
                                     factor_proj_a=f.q_a[:, f_cols].float(), factor_scale=(lam[f_rows][:, f_cols] + damping).rsqrt().float(),
                                     factor_rank=min(rank, len(f_rows), len(f_cols)), factor_slot=slot, factor_dtype=config.dtype)
            slot += layers[name].factor_dim
            shares[name] = len(entries)
        captured = float(u[kept].square().sum()) / total if total > 0 else 1.0
        return cls(layers, slot, captured, shares)


def _factor_size(shapes: list[tuple[int, int]], slots: int, largest: int, dtype: str) -> tuple[int, int]:
    """One block side k (≤ ``largest``) and rank r for every layer's factors, using at most ``slots`` slots:
    the largest k that affords rank 1, then the largest rank that k affords (a small model's blocks are whole
    layers, and the rest of the share goes to rank)."""
    def cost(k: int, r: int) -> int:
        return sum(factor_slots(min(r, k, d_out, d_in), min(k, d_out), min(k, d_in), dtype) for d_out, d_in in shapes)

    k = largest
    while k > 0 and cost(k, 1) > slots:
        k -= 1
    if k == 0:
        return 0, 0
    r = 1
    while r < k and cost(k, r + 1) <= slots and cost(k, r + 1) > cost(k, r):
        r += 1
    return k, r


def _block(u: torch.Tensor, wanted: torch.Tensor, cost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvector rows and columns a layer's block spans: those holding the ``wanted`` entries, cut (by
    the u they carry) to what ``cost`` × the layer's forward affords: k_out·d_out + k_in·d_in + k_out·k_in
    flops per token for the projections and the outer product, against d_out·d_in."""
    d_out, d_in = u.shape
    mass = u * wanted
    rows = torch.argsort(mass.sum(1), descending=True, stable=True)[: max(1, int(wanted.any(1).sum()))]
    cols = torch.argsort(mass.sum(0), descending=True, stable=True)[: max(1, int(wanted.any(0).sum()))]
    k_out, k_in = len(rows), len(cols)
    while k_out * d_out + k_in * d_in + k_out * k_in > cost * d_out * d_in and (k_out > 1 or k_in > 1):
        k_out, k_in = max(1, int(k_out * 0.95)), max(1, int(k_in * 0.95))
    return rows[:k_out].sort().values, cols[:k_in].sort().values
