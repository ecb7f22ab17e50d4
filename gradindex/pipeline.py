"""End-to-end entry points shared by the CLI and Python users: from names and paths to factors and scores."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

from .data import DEFAULT_TOKEN_BUDGET, Query, TokenizedSet, load_queries, load_texts, tokenize_queries, tokenize_texts
from .errors import GradIndexError
from .factors import Factors, fit_factors
from .layers import select_layers
from .model import load_model, model_fingerprint, prepare_tokenizer, resolve_max_length, tokenizer_fingerprint
from .scores import ScoreResult, compute_scores


def model_and_tokenizer(model, tokenizer, dtype: str | None, device: str) -> tuple[nn.Module, object, str]:
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise GradIndexError("a model object needs its tokenizer passed too")
        prepare_tokenizer(tokenizer)
        return model.eval(), tokenizer, getattr(model.config, "_name_or_path", "") or type(model).__name__
    loaded, loaded_tokenizer = load_model(str(model), dtype=dtype, device=device)
    return loaded, tokenizer or loaded_tokenizer, str(model)


def tokenize_training_data(tokenizer, data, *, text_field: str = "text", max_length: int) -> TokenizedSet:
    dataset = load_texts(data, text_field=text_field)
    return tokenize_texts(tokenizer, dataset[text_field], max_length)


def fit(
    model: str | nn.Module,
    data,
    *,
    tokenizer=None,
    out: str | Path | None = None,
    text_field: str = "text",
    max_length: int | None = None,
    modules: str = "mlp",
    fisher: str = "true",
    seed: int = 0,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Factors:
    """Fit EK-FAC factors of ``model`` on ``data`` and, with ``out``, save them there."""
    model, tokenizer, model_name = model_and_tokenizer(model, tokenizer, dtype, device)
    layers = select_layers(model, modules)
    max_length = resolve_max_length(model, max_length)
    train = tokenize_training_data(tokenizer, data, text_field=text_field, max_length=max_length)
    describe = dict(
        model=model_name,
        model_hash=model_fingerprint(model),
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        data=str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        max_length=max_length,
        extra={"modules": modules, "text_field": text_field},
    )
    factors = fit_factors(
        model, train, layers, pad_id=tokenizer.pad_token_id, fisher=fisher, seed=seed,
        token_budget=token_budget, progress=progress, describe=describe,
    )
    if out is not None:
        factors.save(out)
    return factors


def score(
    model: str | nn.Module,
    factors: Factors | str | Path,
    data,
    queries: Sequence[Query] | str | Path,
    *,
    tokenizer=None,
    text_field: str = "text",
    max_length: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    damping: float | None = None,
    damping_scale: float | None = None,
    per_layer: bool = False,
    per_token: bool = False,
    query_rank: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ScoreResult:
    """EK-FAC influence of every sequence of ``data`` on every query: exact, or with each query's
    preconditioned gradient cut to rank ``query_rank`` (query batching)."""
    model, tokenizer, _ = model_and_tokenizer(model, tokenizer, dtype, device)
    if not isinstance(factors, Factors):
        factors = Factors.load(factors)
    factors.check_model(model_fingerprint(model), tokenizer_fingerprint(tokenizer))
    max_length = resolve_max_length(model, max_length or factors.config.max_length or None)
    if isinstance(queries, (str, Path)):
        queries = load_queries(queries)
    query_set = tokenize_queries(tokenizer, list(queries), resolve_max_length(model, None))
    train = tokenize_training_data(tokenizer, data, text_field=text_field, max_length=max_length)
    return compute_scores(
        model, factors, train, query_set, pad_id=tokenizer.pad_token_id, token_budget=token_budget,
        damping=damping, damping_scale=damping_scale, per_layer=per_layer, per_token=per_token, query_rank=query_rank, progress=progress,
    )
