"""Fitting EK-FAC factors: activation and output-gradient covariances, their eigenbases, and the
eigenvalues re-fitted in those bases (see ``factors`` for what they are used for)."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import capture, device_and_dtype
from .corpus import describe_data, load_texts
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches, tokenize_texts
from .errors import GradIndexError
from .factors import Factors, FitConfig, LayerFactors, rotated_sequence_gradients
from .layers import DEFAULT_MODULES, LayerSpec, coverage, resolve_modules, select_layers
from .model import LanguageModel
from .parallel import Part


def fit(lm: LanguageModel, data, *, text_field: str = "text", split: str | None = None, max_length: int | None = None, modules: str = DEFAULT_MODULES,
        data_name: str | None = None, chat: bool = False, **options) -> Factors:
    """Fit factors of ``lm`` on ``data`` (anything :func:`corpus.load_texts` reads); ``options`` as for
    :func:`fit_factors` (fisher, seed, token_budget, progress). ``data_name`` is how ``factors.json`` names
    the data when ``data`` is an object rather than a path."""
    layers = select_layers(lm.model, modules)
    max_length = lm.max_length(max_length)
    dataset = load_texts(data, text_field=text_field, split=split, chat=lm.tokenizer if chat else None)
    train = tokenize_texts(lm.tokenizer, dataset[text_field], max_length)
    describe = dict(
        model=lm.name, model_hash=lm.model_hash, tokenizer_hash=lm.tokenizer_hash, data=data_name or describe_data(data),
        text_field=text_field, modules=resolve_modules(lm.model, modules), max_length=max_length,
        **{k: v for k, v in coverage(lm.model, layers).items() if k != "layers"},
    )
    return fit_factors(lm.model, train, layers, describe=describe, **options)


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = (matrix + matrix.T) / 2  # symmetric up to rounding; eigh reads one triangle only
    return torch.linalg.eigh(matrix.double())


def fit_factors(
    model: nn.Module,
    train: TokenizedSet,
    layers: list[LayerSpec],
    *,
    fisher: str = "true",
    seed: int = 0,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: bool = True,
    describe: dict | None = None,
    part: Part | None = None,
) -> Factors:
    """Fit EK-FAC factors on ``train`` in two passes: covariances, then the eigenvalue correction.

    ``describe`` fills the provenance fields of the :class:`FitConfig` (model name and hashes, data). Under
    torchrun (``part``) each rank passes over its share of the batches and the sums are added across ranks
    before each step that reads them, so every rank ends with the factors one process would fit (labels are
    drawn per sequence, whatever the batch or rank).
    """
    part = part or Part()
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

    def passes(desc: str, on_layer, called: set[str] | None = None) -> int:
        """One pass over ``train``; returns the number of tokens seen (and adds the layers called to ``called``)."""
        tokens = 0
        mine = [rows for i, rows in enumerate(plan) if part.owns(i)]
        for rows in tqdm(mine, desc=desc, disable=not progress or not part.leader, unit="batch"):
            batch = collate(train, rows).to(device)
            tokens += int(batch.attention_mask.sum())
            names = capture(model, layers, batch, on_layer, sample_seed=sample_seed)
            if called is not None:
                called |= names
        return int(part.sum(torch.tensor(tokens, dtype=torch.int64)))

    # Sums, and the saved factors, in float32 (float64 for a float64 model), as kronfluence keeps them:
    # float64 sums cost 0.45 GiB more peak RSS on SmolLM2-135M (5.20 vs 4.75) and moved Λ by 4e-6 relative.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cov_a = {s.name: torch.zeros(s.d_in, s.d_in, dtype=acc, device=device) for s in layers}
    cov_s = {s.name: torch.zeros(s.d_out, s.d_out, dtype=acc, device=device) for s in layers}

    def covariances(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
        a, d = a.reshape(-1, a.shape[-1]).to(acc), delta.reshape(-1, delta.shape[-1]).to(acc)
        cov_a[name].addmm_(a.T, a)
        cov_s[name].addmm_(d.T, d)

    called: set[str] = set()
    n_tokens = passes("covariances", covariances, called)
    # A layer the forward never runs (Mamba's dt_proj under some kernels, a branch this data never takes) has
    # no covariance to invert: it is left out of the factors, and FitConfig.skipped says so.
    calls = part.sum(torch.tensor([s.name in called for s in layers], dtype=torch.int64, device=device))
    skipped = [s.name for s, n in zip(layers, calls.tolist()) if n == 0]
    layers = [s for s in layers if s.name not in skipped]
    if not layers:
        raise GradIndexError(f"none of the {len(skipped)} selected layers is called by the model's forward: {skipped[:4]}")
    bases = {}
    for s in tqdm(layers, desc="eigendecomposition", disable=not progress or not part.leader, unit="layer"):
        a_vals, q_a = _eigh(part.sum(cov_a.pop(s.name)) / n_tokens)
        s_vals, q_s = _eigh(part.sum(cov_s.pop(s.name)) / n_tokens)
        # Eigenvectors kept in the compute dtype only (what the correction pass rotates with and what is saved):
        # float64 copies of every layer's bases would double the fit's peak memory on a real model.
        bases[s.name] = (a_vals, q_a.to(dtype), s_vals, q_s.to(dtype))

    lam = {s.name: torch.zeros(s.d_out, s.d_in, dtype=acc, device=device) for s in layers}
    q_cast = {name: (q_a, q_s) for name, (_, q_a, _, q_s) in bases.items()}

    def correction(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
        lam[name] += rotated_sequence_gradients(a, delta, *q_cast[name]).square().sum(0).to(acc)

    passes("eigenvalue correction", correction)
    lam = {name: part.sum(t) for name, t in lam.items()}
    n_sequences = sum(len(rows) for rows in plan)  # sequences with a scored token

    # Kept in the dtype they are saved in, so factors used straight after fitting and factors read back
    # from disk whiten and precondition identically.
    factors = {
        name: LayerFactors(*(t.to("cpu", acc) for t in (q_a, q_s, lam[name] / n_sequences, a_vals, s_vals)))
        for name, (a_vals, q_a, s_vals, q_s) in bases.items()
    }
    config = FitConfig(
        layers=[asdict(s) for s in layers],
        skipped=skipped,
        n_sequences=len(train),
        n_tokens=train.n_tokens,
        n_truncated=train.n_truncated,
        data_hash=train.fingerprint(),
        fisher=fisher,
        seed=seed,
        token_budget=token_budget,
        compute_dtype=str(dtype).removeprefix("torch."),
        factor_dtype=str(acc).removeprefix("torch."),
        fit_seconds=time.perf_counter() - started,
        **(describe or {}),
    )
    return Factors(factors, config)
