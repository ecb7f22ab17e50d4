"""The façade: every ``gradindex`` verb as one Python function, from names and paths to results.

The CLI calls nothing else. A model is given by name or path (loaded here, once) or as a loaded
:class:`~gradindex.model.LanguageModel` or ``nn.Module`` with its tokenizer; an index by its folder or as
an opened :class:`~gradindex.search.GradIndex`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from . import builder, store, update
from .analysis import DEFAULT_SAMPLE
from .analysis import outliers as _outliers
from .client import query_server
from .corpus import load_texts
from .data import DEFAULT_TOKEN_BUDGET, Query, as_queries, tokenize_queries, tokenize_texts
from .errors import GradIndexError
from .files import atomic_write
from .evaluation import EvalReport
from .evaluation import evaluate as _evaluate
from .factors import Factors
from .fitting import fit as _fit
from .manifest import Manifest
from .layers import DEFAULT_MODULES, coverage, resolve_modules, select_layers
from .model import load_model
from .options import DEFAULT_K2, BuildOptions, Limits, QueryOptions, parse_part
from .parallel import Part
from .report import write_report
from .scores import ScoreResult, compute_scores
from .search import GradIndex, QueryResult
from .server import serve as _serve
from .preconditioners import PRECONDITIONERS, check_inputs, parse_methods, training_scores
from .training import TrainRecipe, log_probs
from .validation import Retrainer, ValidationConfig
from .validation import validate as _validate


def fit(model, data, *, tokenizer=None, out: str | Path | None = None, text_field: str = "text", split: str | None = None,
        max_length: int | None = None, modules: str = DEFAULT_MODULES, fisher: str = "true", seed: int = 0, token_budget: int = DEFAULT_TOKEN_BUDGET,
        chat: bool = False, dtype: str | None = None, device: str = "cpu", progress: bool = True) -> Factors:
    """Fit EK-FAC factors of ``model`` on ``data`` and, with ``out``, save them there. Launched by torchrun, the
    ranks share the passes over the data and rank 0 saves."""
    part = Part.of()
    lm = load_model(model, tokenizer, dtype=dtype, device=part.device(device))
    factors = _fit(lm, data, text_field=text_field, split=split, chat=chat, max_length=max_length, modules=modules, fisher=fisher, seed=seed,
                   token_budget=token_budget, progress=progress, part=part)
    if out is not None and part.leader:
        factors.save(out)
    part.finish()
    return factors


def layers(model, *, tokenizer=None, modules: str = DEFAULT_MODULES, dtype: str | None = None) -> dict:
    """A dry run of a layer selection: which modules ``fit`` would track and what share of the blocks' weights
    they are (:func:`layers.coverage`)."""
    lm = load_model(model, tokenizer, dtype=dtype)
    return {"model": lm.name, "modules": resolve_modules(lm.model, modules), **coverage(lm.model, select_layers(lm.model, modules))}


def score(model, factors: Factors | str | Path, data, queries: Sequence[Query] | str | Path, *, tokenizer=None,
          text_field: str = "text", split: str | None = None, chat: bool = False, max_length: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
          damping: float | None = None, damping_scale: float | None = None, per_layer: bool = False, per_token: bool = False, per_head: bool = False,
          query_rank: int | None = None, dtype: str | None = None, device: str = "cpu", progress: bool = True) -> ScoreResult:
    """EK-FAC influence of every sequence of ``data`` on every query: exact, or with each query's
    preconditioned gradient cut to rank ``query_rank`` (query batching)."""
    lm = load_model(model, tokenizer, dtype=dtype, device=device)
    if not isinstance(factors, Factors):
        factors = Factors.load(factors)
    factors.check_model(lm.model_hash, lm.tokenizer_hash)
    max_length = lm.max_length(max_length or factors.config.max_length or None)
    query_set = tokenize_queries(lm.tokenizer, as_queries(queries), lm.max_length(None))
    train = tokenize_texts(lm.tokenizer, load_texts(data, text_field=text_field, split=split, chat=lm.tokenizer if chat else None)[text_field], max_length)
    return compute_scores(lm.model, factors, train, query_set, token_budget=token_budget, damping=damping, damping_scale=damping_scale,
                          per_layer=per_layer, per_token=per_token, per_head=per_head, query_rank=query_rank,
                          progress=progress)


def build(model, data, out: str | Path, *, factors: Factors | str | Path | None = None, tokenizer=None,
          options: BuildOptions | None = None, shard: tuple[int, int] | str | None = None, dtype: str | None = None,
          device: str = "cpu", progress: bool = True, **overrides) -> Path:
    """Build (or resume) the index of ``data`` under ``out`` with ``options`` and/or its fields as keywords;
    with ``shard=(i, n)`` only part i of n (under torchrun, each rank builds its part)."""
    options = BuildOptions.of(options, **overrides)
    part = Part.of(parse_part(shard))
    lm = load_model(model, tokenizer, dtype=dtype, device=part.device(device))
    return builder.build(lm, data, out, factors=factors, options=options, part=part, progress=progress)


def merge(parts: list[str | Path], out: str | Path, *, max_memory: int | str | None = None, index_key: str | None = None,
          progress: bool = True) -> Manifest:
    """Join parts built with ``shard=(i, n)`` into one index (FAISS index within ``max_memory``, e.g. "4G")."""
    options = BuildOptions() if max_memory is None else BuildOptions(max_memory=max_memory)
    return builder.merge(parts, out, max_memory=options.max_memory, index_key=index_key, progress=progress)


def add(index: str | Path, data, *, model=None, tokenizer=None, text_field: str | None = None, split: str | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET, dtype: str | None = None, device: str = "cpu", progress: bool = True) -> Manifest:
    """Append ``data``'s rows to a built index with its own factors (model: the index's own unless given)."""
    build = store.load_manifest(Path(index)).build
    model, tokenizer = model if model is not None else store.model_source(Path(index), build), tokenizer or build.tokenizer or None
    lm = load_model(model, tokenizer, dtype=dtype, device=device)
    return update.add(lm, data, index, text_field=text_field, split=split, token_budget=token_budget, progress=progress)


def remove(index: str | Path, *, rows: Sequence[int] | str | None = None, where: str | None = None) -> tuple[Manifest, int]:
    """Tombstone rows (ids, or ``"3,17"``) or those matching ``where``; returns the manifest and how many were removed."""
    if isinstance(rows, str):
        try:
            rows = [int(r) for r in rows.replace(" ", "").split(",") if r]
        except ValueError:
            raise GradIndexError(f"--rows takes row ids separated by commas, e.g. 3,17; got {rows!r}") from None
    return update.remove(index, rows=rows, where=where)


def compact(index: str | Path, *, progress: bool = True) -> Manifest:
    """Rewrite the index without its removed rows."""
    return update.compact(index, progress=progress)


def info(index: str | Path) -> Manifest:
    return store.load_manifest(Path(index))


def verify(index: str | Path) -> list[str]:
    """Every file of the index re-hashed against its manifest: the problems found (none when sound)."""
    return store.verify(Path(index))


def open_index(index: GradIndex | str | Path, *, model=None, tokenizer=None, dtype: str | None = None, device: str = "cpu") -> GradIndex:
    """An opened index (as given, or opened from its folder with its own model unless ``model``)."""
    if isinstance(index, GradIndex):
        return index
    return GradIndex.open(index, model=model, tokenizer=tokenizer, dtype=dtype, device=device)


def query(index: GradIndex | str | Path | None, queries, k: int | None = None, *, options: QueryOptions | None = None, model=None,
          dtype: str | None = None, device: str = "cpu", server: str | None = None, token: str | None = None, **overrides) -> list[QueryResult]:
    """The cascade for each query (a list of :class:`Query` or a jsonl file of them); with ``server``, answered
    by the ``gradindex serve`` at that URL instead (``token``: its bearer token, default ``$GRADINDEX_TOKEN``)."""
    if server is not None:
        if index is not None or model is not None:
            raise GradIndexError("--server answers with the server's own index and model: give no INDEX and no --model")
        return query_server(server, as_queries(queries), QueryOptions.of(options, k, **overrides), token=token)
    if index is None:
        raise GradIndexError("give an INDEX folder, or --server URL")
    return open_index(index, model=model, dtype=dtype, device=device).query_many(queries, k, options=options, **overrides)


def serve(index: str | Path, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None, limits: Limits | None = None,
          model=None, dtype: str | None = None, device: str = "cpu") -> None:
    """Serve the index over HTTP until stopped: the JSON API and the search page (:mod:`gradindex.server`)."""
    _serve(index, host=host, port=port, token=token, limits=limits or Limits(), model=model, dtype=dtype, device=device)


def outliers(index: GradIndex | str | Path, n: int = 20, *, exact: bool = False, damping: float | None = None,
             damping_scale: float | None = None, model=None, dtype: str | None = None, device: str = "cpu") -> list[tuple[int, float, str]]:
    """The sequences of highest self-influence: (row, value, text), highest first."""
    opened = open_index(index, model=model, dtype=dtype, device=device)
    return _outliers(opened, n, exact=exact, damping=damping, damping_scale=damping_scale)


def evaluate(index: GradIndex | str | Path, queries, k: int | None = None, *, options: QueryOptions | None = None, model=None,
             dtype: str | None = None, device: str = "cpu", progress: bool = True, **overrides) -> EvalReport:
    """Recall of each cascade stage against brute-force exact scores, and latency."""
    opened = open_index(index, model=model, dtype=dtype, device=device)
    return _evaluate(opened, queries, k, options=options, progress=progress, **overrides)


def report(index: GradIndex | str | Path, prompt: str, completion: str, out: str | Path, *, options: QueryOptions | None = None,
           exact_sparsity: bool = False, sparsity_sample: int = DEFAULT_SAMPLE, model=None, dtype: str | None = None,
           device: str = "cpu", **overrides) -> Path:
    """One self-contained HTML page of a query's influence."""
    opened = open_index(index, model=model, dtype=dtype, device=device)
    return write_report(opened, prompt, completion, Path(out), options=options, exact_sparsity=exact_sparsity,
                        sparsity_sample=sparsity_sample, **overrides)


def validate(model, init, recipe: TrainRecipe | str | Path, data, queries, out: str | Path, *, methods: Sequence[str] | str | None = None,
             config: ValidationConfig | None = None, factors: Factors | str | Path | None = None, optimizer_state: str | Path | None = None,
             index: GradIndex | str | Path | None = None, groups: Sequence[str] | None = None, text_field: str = "text",
             max_length: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """LDS and leave-top-k-out of each method's scores (and of ``index``'s answers) by retraining ``init`` with
    ``recipe`` on subsets of ``data`` (:mod:`gradindex.validation`); written to ``out``/validation.json, runs cached under ``out``.
    ``methods`` default: every preconditioner, adam when ``optimizer_state`` is given."""
    config = config or ValidationConfig()
    Path(out).mkdir(parents=True, exist_ok=True)
    recipe = recipe if isinstance(recipe, TrainRecipe) else TrainRecipe.load(recipe)
    methods = parse_methods(methods or [m for m in PRECONDITIONERS if m != "adam" or optimizer_state is not None])
    check_inputs(methods, optimizer_state)
    lm, start = load_model(model, device=device), load_model(init, device=device)
    if start.tokenizer_hash != lm.tokenizer_hash:
        raise GradIndexError("the initial model's tokenizer differs from the trained model's")
    texts = list(load_texts(data, text_field=text_field)[text_field])
    max_length = lm.max_length(max_length)
    train_set, asked = tokenize_texts(lm.tokenizer, texts, max_length), as_queries(queries)
    query_set = tokenize_queries(lm.tokenizer, asked, lm.max_length(None))
    if "ekfac" in methods and not isinstance(factors, Factors):
        factors = Factors.load(factors) if factors is not None else _fit(lm, texts, max_length=max_length, progress=progress)
    if isinstance(factors, Factors):
        factors.check_model(lm.model_hash, lm.tokenizer_hash)
    layers = factors.specs if isinstance(factors, Factors) else select_layers(lm.model, DEFAULT_MODULES)
    scores = {m: training_scores(m, lm.model, layers, train_set, query_set, factors=factors, optimizer_state=optimizer_state, train_texts=texts,
                                 query_texts=[q.prompt + q.completion for q in asked], progress=progress) for m in methods}
    scores["random"] = np.random.default_rng(config.seed).standard_normal(scores[methods[0]].shape).astype(np.float32)
    rankings = {}
    if index is not None and config.leave_out:  # an index's answers serve leave-top-k-out only
        opened = open_index(index, model=lm)
        if opened.reader.n_rows != len(texts) or list(opened.reader.texts()) != texts:
            raise GradIndexError(f"the index's {opened.reader.n_rows} rows are not the {len(texts)} sequences of the data: leave-top-k-out needs an index "
                                 "of these sequences, one row each (built with --truncate)")
        found = opened.query_many(asked, max(config.leave_out), k2=max(DEFAULT_K2, max(config.leave_out)))
        rankings["index"] = np.array([[h.offset for h in r.hits] for r in found])
    retrainer = Retrainer(start.model, train_set, query_set, recipe, out, keep_models=config.keep_models, progress=progress)
    report = {**_validate(retrainer, scores, config, rankings=rankings, groups=groups, reference_log_probs=log_probs(lm.model, query_set)),
              "recipe": asdict(recipe), "config": asdict(config)}
    with atomic_write(Path(out) / "validation.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report
