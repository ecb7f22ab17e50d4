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
        if self.code_dim < 1:
            raise GradIndexError(f"a budget of {self.budget} bytes does not hold a code and its stage-1 code; raise --budget"
                                 + (" or lower --stage1-dim" if self.stage1_dim else ""))

    @property
    def code_dim(self) -> int:
        """Numbers per code the budget pays for (before it is cut to what the model has)."""
        itemsize = np.dtype(self.dtype).itemsize
        if self.stage1_dim is None:  # the stage-1 code spans the code: a bit per (padded) entry more
            dim = int((self.budget - 8) // (itemsize + 1 / 8))
            return min(dim, (self.budget - stage1_bytes(dim)) // itemsize)
        return (self.budget - stage1_bytes(self.stage1_dim)) // itemsize

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

    @property
    def used(self) -> bool:
        return len(self.entries) > 0

    def to(self, device, dtype) -> "LayerPlan":
        moved = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in asdict(self).items()}
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
        tops = torch.cat([torch.topk(u.flatten(), min(config.code_dim, u.numel())).values for _, _, u in variances.values()])
        cut = float(torch.topk(tops, min(config.code_dim, len(tops))).values[-1])
        blocks, values = {}, []
        for spec in factors.specs:
            lam, damping, u = variances[spec.name]
            rows, cols = _block(u, u >= cut, config.block_cost)
            blocks[spec.name] = (rows, cols, (lam[rows][:, cols].flatten() + damping).rsqrt())
            values.append(u[rows][:, cols].flatten())
        owner = torch.cat([torch.full((len(v),), i) for i, v in enumerate(values)])
        position = torch.cat([torch.arange(len(v)) for v in values])
        u = torch.cat(values)
        kept = torch.argsort(u, descending=True, stable=True)[: config.code_dim]  # slot s holds entry kept[s]
        layers, shares = {}, {}
        for i, (name, (rows, cols, scale)) in enumerate(blocks.items()):
            f = factors.layers[name]
            slots = (owner[kept] == i).nonzero().squeeze(-1)
            entries = position[kept[slots]]
            layers[name] = LayerPlan(rows=rows, cols=cols, proj_s=f.q_s[:, rows].float(), proj_a=f.q_a[:, cols].float(), entries=entries, slots=slots,
                                     scale=scale[entries].float())
            shares[name] = len(entries)
        captured = float(u[kept].square().sum()) / total if total > 0 else 1.0
        return cls(layers, len(kept), captured, shares)


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
