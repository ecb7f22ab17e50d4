"""EK-FAC factors: fitting, damping, preconditioning, and their safetensors + JSON artifacts.

Per tracked layer (gradient G of shape d_out × d_in, see ``layers``):
  A = E_tokens[a aᵀ] = Q_A diag Q_Aᵀ,   S = E_tokens[δ δᵀ] = Q_S diag Q_Sᵀ   (δ under sampled labels),
  Λ = E_sequences[(Q_Sᵀ G Q_A)²]   (the eigenvalue correction),
  H⁻¹G ≈ Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ,   λ = damping_scale · mean(Λ) unless given.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .capture import capture, device_and_dtype
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .errors import GradIndexError
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
    max_length: int = 0
    fisher: str = "true"  # "true": labels sampled from the model; "empirical": the data's own labels
    seed: int = 0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    compute_dtype: str = "float32"
    factor_dtype: str = "float32"
    damping_scale: float = DEFAULT_DAMPING_SCALE
    gradindex_version: str = __version__
    fit_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(**d) for d in self.layers]


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
            return float(damping)
        scale = self.config.damping_scale if damping_scale is None else damping_scale
        return scale * float(self.layers[name].lam.double().mean())

    def rotate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """G̃ = Q_Sᵀ G Q_A for a stack of gradients (…, d_out, d_in)."""
        f = self.layers[name]
        return f.q_s.T.to(grad) @ grad @ f.q_a.to(grad)

    def precondition(self, name: str, grad: torch.Tensor, damping: float | None = None, damping_scale: float | None = None) -> torch.Tensor:
        """H⁻¹G for a stack of gradients (…, d_out, d_in), in their dtype."""
        f = self.layers[name]
        lam = self.damping(name, damping, damping_scale)
        scaled = self.rotate(name, grad) / (f.lam.to(grad) + lam)
        return f.q_s.to(grad) @ scaled @ f.q_a.T.to(grad)

    def check_model(self, model_hash: str, tokenizer_hash: str | None = None) -> None:
        if model_hash != self.config.model_hash:
            raise GradIndexError(
                f"factors were fitted on another model (weights hash {self.config.model_hash}, "
                f"this model's is {model_hash}; fitted on {self.config.model!r})"
            )
        if tokenizer_hash is not None and tokenizer_hash != self.config.tokenizer_hash:
            raise GradIndexError("factors were fitted with another tokenizer (tokenizer hash differs)")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.config.factor_dtype)
        tensors = {
            f"{name}.{key}": value.to(dtype).contiguous()
            for name, f in self.layers.items()
            for key, value in asdict(f).items()
        }
        # Write under temporary names and rename, so an interrupted save never leaves a half artifact.
        tmp = directory / (FACTORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "gradindex-ekfac"})
        tmp.replace(directory / FACTORS_FILE)
        tmp = directory / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.config), indent=2))
        tmp.replace(directory / CONFIG_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Factors":
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / FACTORS_FILE).is_file():
            raise GradIndexError(f"no factors in {directory} (expected {CONFIG_FILE} and {FACTORS_FILE}; run `gradindex fit`)")
        try:
            config = FitConfig(**json.loads((directory / CONFIG_FILE).read_text()))
            tensors = load_file(str(directory / FACTORS_FILE))
        except Exception as e:
            raise GradIndexError(f"cannot read factors in {directory}: {type(e).__name__}: {e}") from None
        layers = {}
        for spec in config.layer_specs:
            try:
                layers[spec.name] = LayerFactors(**{k: tensors[f"{spec.name}.{k}"] for k in LayerFactors.__dataclass_fields__})
            except KeyError as e:
                raise GradIndexError(f"factors in {directory} are incomplete: missing {e.args[0]}") from None
        return cls(layers, config)


def _rotate_first(n_tokens: int, d_out: int, d_in: int) -> bool:
    """Whether rotating token matrices before the outer product is cheaper than rotating G itself."""
    return n_tokens * (d_out**2 + d_in**2) < d_out * d_in * (d_out + d_in)


def rotated_sequence_gradients(a: torch.Tensor, delta: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """G̃_b = Q_Sᵀ (δ_bᵀ a_b) Q_A for each sequence of a batch, in whichever order costs fewer flops."""
    d_out, d_in = delta.shape[-1], a.shape[-1]
    if _rotate_first(a.shape[1], d_out, d_in):
        return torch.einsum("bto,bti->boi", delta @ q_s, a @ q_a)
    return q_s.T @ torch.einsum("bto,bti->boi", delta, a) @ q_a


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = (matrix + matrix.T) / 2  # symmetric up to rounding; eigh reads one triangle only
    return torch.linalg.eigh(matrix.double())


def fit_factors(
    model: nn.Module,
    train: TokenizedSet,
    layers: list[LayerSpec],
    *,
    pad_id: int,
    fisher: str = "true",
    seed: int = 0,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: bool = True,
    describe: dict | None = None,
) -> Factors:
    """Fit EK-FAC factors on ``train`` in two passes: covariances, then the eigenvalue correction.

    ``describe`` fills the provenance fields of the :class:`FitConfig` (model name and hashes, data).
    """
    if fisher not in ("true", "empirical"):
        raise GradIndexError(f"fisher must be 'true' or 'empirical', not {fisher!r}")
    if len(train) == 0:
        raise GradIndexError("no training sequences to fit factors on")
    started = time.perf_counter()
    device, dtype = device_and_dtype(model)
    sample_seed = seed if fisher == "true" else None
    plan = plan_batches(train, token_budget)
    if not plan:
        raise GradIndexError("every training sequence is empty: nothing to fit factors on")

    def passes(desc: str):
        for rows in tqdm(plan, desc=desc, disable=not progress, unit="batch"):
            batch = collate(train, rows, pad_id).to(device)
            captured, _ = capture(model, layers, batch, sample_seed=sample_seed)
            yield batch, captured

    cov_a = {s.name: torch.zeros(s.d_in, s.d_in, dtype=torch.float64, device=device) for s in layers}
    cov_s = {s.name: torch.zeros(s.d_out, s.d_out, dtype=torch.float64, device=device) for s in layers}
    n_tokens = 0
    for batch, captured in passes("covariances"):
        n_tokens += int(batch.attention_mask.sum())
        for name, c in captured.items():
            a = c.a.reshape(-1, c.a.shape[-1]).to(dtype)
            d = c.delta.reshape(-1, c.delta.shape[-1]).to(dtype)
            cov_a[name] += (a.T @ a).double()
            cov_s[name] += (d.T @ d).double()

    bases = {}
    for s in tqdm(layers, desc="eigendecomposition", disable=not progress, unit="layer"):
        a_vals, q_a = _eigh(cov_a[s.name] / n_tokens)
        s_vals, q_s = _eigh(cov_s[s.name] / n_tokens)
        bases[s.name] = (a_vals, q_a, s_vals, q_s)
    del cov_a, cov_s

    lam = {s.name: torch.zeros(s.d_out, s.d_in, dtype=torch.float64, device=device) for s in layers}
    q_cast = {name: (q_a.to(dtype), q_s.to(dtype)) for name, (_, q_a, _, q_s) in bases.items()}
    n_sequences = 0
    for batch, captured in passes("eigenvalue correction"):
        n_sequences += len(batch.rows)
        for name, c in captured.items():
            q_a, q_s = q_cast[name]
            g = rotated_sequence_gradients(c.a.to(dtype), c.delta.to(dtype), q_a, q_s)
            lam[name] += g.square().sum(0).double()

    factors = {
        name: LayerFactors(q_a=q_a.cpu(), q_s=q_s.cpu(), lam=(lam[name] / n_sequences).cpu(), a_eigvals=a_vals.cpu(), s_eigvals=s_vals.cpu())
        for name, (a_vals, q_a, s_vals, q_s) in bases.items()
    }
    config = FitConfig(
        layers=[asdict(s) for s in layers],
        n_sequences=len(train),
        n_tokens=train.n_tokens,
        n_truncated=train.n_truncated,
        data_hash=train.fingerprint(),
        fisher=fisher,
        seed=seed,
        token_budget=token_budget,
        compute_dtype=str(dtype).removeprefix("torch."),
        factor_dtype="float64" if dtype == torch.float64 else "float32",
        fit_seconds=time.perf_counter() - started,
        **(describe or {}),
    )
    return Factors(factors, config)
