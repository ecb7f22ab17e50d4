"""EK-FAC factors as an artifact: damping, rotation, preconditioning, and their safetensors + JSON files
(fitting them is ``fitting``'s job).

Per tracked layer (gradient G of shape d_out × d_in, see ``layers``):
  A = E_tokens[a aᵀ] = Q_A diag Q_Aᵀ,   S = E_tokens[δ δᵀ] = Q_S diag Q_Sᵀ   (δ under sampled labels),
  Λ = E_sequences[(Q_Sᵀ G Q_A)²]   (the eigenvalue correction),
  H⁻¹G ≈ Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ,   λ = damping_scale · mean(Λ) unless given.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .data import DEFAULT_TOKEN_BUDGET
from .errors import GradIndexError
from .files import atomic_write, from_dict, read_json, sha256, write_json
from .layers import LayerSpec

FACTORS_FILE = "factors.safetensors"
CONFIG_FILE = "factors.json"
DEFAULT_DAMPING_SCALE = 0.1


@dataclass
class FitConfig:
    """Everything that produced a set of factors, saved beside them as ``factors.json``."""

    layers: list[dict]
    n_sequences: int
    n_tokens: int
    n_truncated: int
    data_hash: str
    model: str = ""
    model_hash: str = ""
    tokenizer_hash: str = ""
    data: str = ""
    text_field: str = "text"
    modules: str = "mlp"  # the layer selection the layers came from (``select_layers``)
    max_length: int = 0
    fisher: str = "true"  # "true": labels sampled from the model; "empirical": the data's own labels
    seed: int = 0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    compute_dtype: str = "float32"
    factor_dtype: str = "float32"
    damping_scale: float = DEFAULT_DAMPING_SCALE
    gradindex_version: str = __version__
    fit_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # selected layers the forward never called, so not fitted
    tracked_fraction: float = 0.0  # share of the blocks' ≥ 2-D weights the layers cover (``layers.coverage``)
    untracked_mlp: list[str] = field(default_factory=list)  # MLP/expert weights the selection leaves out
    note: str = ""  # the warning about those, if any

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(**d) for d in self.layers]

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "FitConfig":
        data = dict(data)
        data.update(data.pop("extra", None) or {})  # gradindex 0.1 kept modules and text_field under "extra"
        return from_dict(cls, data, where=where)


@dataclass
class LayerFactors:
    """One layer's eigenbases and corrected eigenvalues; ``lam`` is Λ (d_out × d_in), undamped."""

    q_a: torch.Tensor  # (d_in, d_in), columns are eigenvectors of A
    q_s: torch.Tensor  # (d_out, d_out), columns are eigenvectors of S
    lam: torch.Tensor  # (d_out, d_in)
    a_eigvals: torch.Tensor
    s_eigvals: torch.Tensor


class Factors:
    """EK-FAC factors for a set of layers, plus the config that produced them."""

    def __init__(self, layers: dict[str, LayerFactors], config: FitConfig):
        self.layers = layers
        self.config = config

    @property
    def specs(self) -> list[LayerSpec]:
        return self.config.layer_specs

    def damping(self, name: str, damping: float | None = None, damping_scale: float | None = None) -> float:
        """Absolute damping λ for a layer: ``damping`` if given, else ``damping_scale`` × mean Λ."""
        if damping is not None:
            value, what = float(damping), "damping"
        else:
            scale = self.config.damping_scale if damping_scale is None else damping_scale
            value, what = float(scale) * float(self.layers[name].lam.double().mean()), f"damping scale {scale!r} × mean eigenvalue"
        if not (math.isfinite(value) and value > 0):  # λ ≤ 0 or NaN: no inverse, or NaN scores everywhere
            raise GradIndexError(f"{what} gives damping {value!r} for {name}; the damping must be a positive number")
        return value

    def rotate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """G̃ = Q_Sᵀ G Q_A for a stack of gradients (…, d_out, d_in)."""
        f = self.layers[name]
        return f.q_s.T.to(grad) @ grad @ f.q_a.to(grad)

    def precondition(self, name: str, grad: torch.Tensor, damping: float | None = None, damping_scale: float | None = None) -> torch.Tensor:
        """H⁻¹G for a stack of gradients (…, d_out, d_in), in their dtype."""
        return self.precondition_rotated(name, self.rotate(name, grad), damping, damping_scale)

    def precondition_rotated(self, name: str, rotated: torch.Tensor, damping: float | None = None,
                             damping_scale: float | None = None) -> torch.Tensor:
        """H⁻¹G given G̃ = Q_Sᵀ G Q_A (cheaper to form from a short sequence's tokens than by rotating G)."""
        f = self.layers[name]
        scaled = rotated / (f.lam.to(rotated) + self.damping(name, damping, damping_scale))
        return f.q_s.to(rotated) @ scaled @ f.q_a.T.to(rotated)

    def check_model(self, model_hash: str, tokenizer_hash: str | None = None) -> None:
        if model_hash != self.config.model_hash:
            raise GradIndexError(
                f"factors were fitted on another model (weights hash {self.config.model_hash}, "
                f"this model's is {model_hash}; fitted on {self.config.model!r})"
            )
        if tokenizer_hash is not None and tokenizer_hash != self.config.tokenizer_hash:
            raise GradIndexError("factors were fitted with another tokenizer (tokenizer hash differs)")

    def save(self, directory: str | Path, *, expect_sha256: str | None = None) -> str:
        """Write ``factors.safetensors`` and ``factors.json`` into ``directory``; returns the tensors' sha256.

        With ``expect_sha256`` the write is refused, and ``directory`` left as it was, unless the new
        tensors hash to it.
        """
        directory = Path(directory)
        _check_finite(self.layers, "fitted factors (NaN or infinite weights or activations in the model or data?)")
        dtype = getattr(torch, self.config.factor_dtype)
        tensors = {
            f"{name}.{key}": value.to(dtype).contiguous()
            for name, f in self.layers.items()
            for key, value in _tensors(f).items()
        }
        with atomic_write(directory / FACTORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "gradindex-ekfac"})
            digest = sha256(tmp)
            if expect_sha256 is not None and digest != expect_sha256:
                raise GradIndexError(f"{directory} holds other factors (sha256 {expect_sha256[:16]}…, these are {digest[:16]}…)")
        write_json(directory / CONFIG_FILE, asdict(self.config), indent=2)
        return digest

    @classmethod
    def load(cls, directory: str | Path) -> "Factors":
        directory = Path(directory)
        if not has_factors(directory):
            raise GradIndexError(f"no factors in {directory} (expected {CONFIG_FILE} and {FACTORS_FILE}; run `gradindex fit`)")
        config = FitConfig.from_dict(read_json(directory / CONFIG_FILE), where=str(directory / CONFIG_FILE))
        try:
            tensors = load_file(str(directory / FACTORS_FILE))
        except Exception as e:
            raise GradIndexError(f"cannot read factors in {directory}: {type(e).__name__}: {e}") from None
        layers = {}
        for spec in config.layer_specs:
            try:
                layers[spec.name] = LayerFactors(**{k: tensors[f"{spec.name}.{k}"] for k in LayerFactors.__dataclass_fields__})
            except KeyError as e:
                raise GradIndexError(f"factors in {directory} are incomplete: missing {e.args[0]}") from None
        _check_finite(layers, f"factors in {directory} (the file is damaged; refit or restore it)")
        return cls(layers, config)


def _tensors(f: LayerFactors) -> dict[str, torch.Tensor]:
    """A layer's tensors by field name (``dataclasses.asdict`` would deep-copy every one of them)."""
    return {k: getattr(f, k) for k in LayerFactors.__dataclass_fields__}


def _check_finite(layers: dict[str, LayerFactors], what: str) -> None:
    for name, f in layers.items():
        for key, value in _tensors(f).items():
            if not torch.isfinite(value).all():
                raise GradIndexError(f"{what}: {name}.{key} holds NaN or infinite values")


def has_factors(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / FACTORS_FILE).is_file()


def copy_factors(source: str | Path, target: str | Path) -> None:
    """Copy a factors folder's files as they are (byte for byte, so their hashes stay valid)."""
    for name in (FACTORS_FILE, CONFIG_FILE):
        with atomic_write(Path(target) / name) as tmp:
            shutil.copyfile(Path(source) / name, tmp)


def _rotate_first(n_tokens: int, d_out: int, d_in: int) -> bool:
    """Whether rotating token matrices before the outer product is cheaper than rotating G itself."""
    return n_tokens * (d_out**2 + d_in**2) < d_out * d_in * (d_out + d_in)


def rotated_sequence_gradients(a: torch.Tensor, delta: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """G̃_b = Q_Sᵀ (δ_bᵀ a_b) Q_A for each sequence of a batch, in whichever order costs fewer flops."""
    d_out, d_in = delta.shape[-1], a.shape[-1]
    if _rotate_first(a.shape[1], d_out, d_in):
        return torch.einsum("bto,bti->boi", delta @ q_s, a @ q_a)
    return q_s.T @ torch.einsum("bto,bti->boi", delta, a) @ q_a
