"""The ``gradindex`` command line: a thin layer over :mod:`gradindex.pipeline` and the option dataclasses.

Defaults are the library's own (``BuildOptions``, ``QueryOptions``, ``CompressionConfig``, the façade's
signatures), never restated here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from cli.args import (
    app, _B, _C, _FIT, ModelArg, DataOpt, TextFieldOpt, SplitOpt, ChatOpt, TokenBudgetOpt, DtypeOpt, DeviceOpt, ModulesOpt, TokenizerOpt, IndexArg, IndexModelOpt, PromptOpt, CompletionOpt, QueriesOpt, DampingOpt, DampingScaleOpt, MaxMemoryOpt, IndexKeyOpt, command,
)
from gradindex import pipeline
from gradindex.codeplan import CompressionConfig
from gradindex.data import as_queries
from gradindex.options import BuildOptions, parse_part, parse_size
from gradindex.update import DRIFT_REFIT

@command
def fit(
    model: str = ModelArg,
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Folder to write factors.safetensors and factors.json to."),
    text_field: str = TextFieldOpt, split: Optional[str] = SplitOpt, chat: bool = ChatOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate training sequences to this many tokens (default: the model's context, at most 2048)."),
    modules: str = ModulesOpt,
    empirical_fisher: bool = typer.Option(False, "--empirical-fisher", help="Use the data's labels instead of labels sampled from the model."),
    seed: int = typer.Option(_FIT["seed"], "--seed", help="Seed of the sampled labels."),
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt, tokenizer: Optional[str] = TokenizerOpt,
    device: str = DeviceOpt,
):
    """Fit EK-FAC factors of MODEL on the training data."""
    factors = pipeline.fit(model, data, out=out, text_field=text_field, split=split, chat=chat, max_length=max_length, modules=modules,
                           fisher="empirical" if empirical_fisher else "true", seed=seed, token_budget=token_budget, tokenizer=tokenizer, dtype=dtype, device=device)
    c = factors.config
    if c.n_truncated:
        typer.echo(f"truncated {c.n_truncated} of {c.n_sequences} sequences to {c.max_length} tokens", err=True)
    typer.echo(f"tracked_fraction {c.tracked_fraction:.3f} of the blocks' weights", err=True)
    if c.note:
        typer.echo(f"warning: {c.note}", err=True)
    if c.skipped:
        typer.echo(f"note: skipped {len(c.skipped)} selected layers the model's forward never calls: {', '.join(c.skipped[:6])}", err=True)
    typer.echo(f"fitted {len(factors.layers)} layers on {c.n_sequences} sequences ({c.n_tokens} tokens) in {c.fit_seconds:.1f}s -> {out}")


@command
def scores(
    model: str = ModelArg,
    factors: Path = typer.Option(..., "--factors", help="Folder written by `gradindex fit`."),
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Where to write the n_query × n_train float32 matrix (.npy)."),
    queries: Optional[Path] = QueriesOpt,
    prompt: Optional[str] = PromptOpt,
    completion: Optional[str] = CompletionOpt,
    text_field: str = TextFieldOpt, split: Optional[str] = SplitOpt, chat: bool = ChatOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate training sequences (default: as the factors were fitted)."),
    damping: Optional[float] = DampingOpt, damping_scale: Optional[float] = DampingScaleOpt,
    per_layer: bool = typer.Option(False, "--per-layer", help="Also write per-layer scores (<out>.per_layer.npz)."),
    per_head: bool = typer.Option(False, "--per-head", help="Also write per-head scores of q/k/v/o projections (<out>.per_head.npz; with --modules all at fit)."),
    per_token: bool = typer.Option(False, "--per-token", help="Also write per-token scores (<out>.per_token.npz, one array per training row)."),
    query_rank: Optional[int] = typer.Option(None, "--query-rank", help="Hold each query's preconditioned gradient as a rank-r SVD (less memory for many queries; approximate)."),
    top: int = typer.Option(3, "--top", help="Print this many top training rows per query."),
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt, tokenizer: Optional[str] = TokenizerOpt,
    device: str = DeviceOpt,
):
    """Exact EK-FAC influence of every training sequence on every query."""
    result = pipeline.score(
        model, factors, data, as_queries(queries, prompt=prompt, completion=completion), text_field=text_field, split=split, chat=chat, max_length=max_length,
        token_budget=token_budget, damping=damping, damping_scale=damping_scale, per_layer=per_layer, per_token=per_token, per_head=per_head,
        query_rank=query_rank, tokenizer=tokenizer, dtype=dtype, device=device,
    )
    if result.n_truncated:
        typer.echo(f"truncated {result.n_truncated} training sequences to the maximum length", err=True)
    result.save(out)
    typer.echo(f"scores {result.scores.shape[0]} × {result.scores.shape[1]} -> {out}")
    for q, row in enumerate(result.scores):
        typer.echo(f"query {q}: " + ", ".join(f"row {i} ({row[i]:.4g})" for i in np.argsort(-row)[:top]))


@command
def build(
    model: str = ModelArg,
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Index folder, e.g. indexes/NAME. Re-running the same command resumes it."),
    factors: Optional[Path] = typer.Option(None, "--factors", help="Factors from `gradindex fit` (default: fit them first)."),
    text_field: str = TextFieldOpt, split: Optional[str] = SplitOpt, chat: bool = ChatOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per indexed sequence (default: as the factors were fitted, else the model's context)."),
    chunk: bool = typer.Option(_B.chunk, "--chunk/--truncate", help="Split documents longer than --max-length into windows, each a row (default), or cut them there."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window starts (default: the window length, no overlap; less: windows overlap)."),
    modules: str = ModulesOpt,
    budget: str = typer.Option(f"{_C.budget // 1024}K", "--budget", help="Bytes stored per sequence, e.g. 16K or 64K, whatever the model's size (codes + their stage-1 FAISS codes)."),
    stage1_dim: Optional[int] = typer.Option(None, "--stage1-dim", help="Leading code entries the stage-1 FAISS index searches (default: the whole code; fewer: a smaller, faster, coarser scan)."),
    block_cost: float = typer.Option(_C.block_cost, "--block-cost", help="Projection work per layer while coding, × the layer's own forward (more: a code drawn from more eigen-entries)."),
    factor_share: float = typer.Option(_C.factor_share, "--factor-share", help="Share of the budget for each layer's low-rank factors, which stage 2 scores against the query's full block (0: entries only; real models rank better with 0.75, see README)."),
    factor_block: int = typer.Option(_C.factor_block, "--factor-block", help="Largest side of a layer's factor block (the budget may afford less)."),
    seed: int = typer.Option(_C.seed, "--seed", help="Seed of the rows the FAISS index is trained on."),
    shard_size: int = typer.Option(_B.shard_size, "--shard-size", help="Rows per shard: the unit of resumption."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Build only part i of n (i/n); join the parts with `gradindex merge`."),
    max_memory: Optional[str] = MaxMemoryOpt, index_key: Optional[str] = IndexKeyOpt,
    token_budget: int = TokenBudgetOpt, dtype: Optional[str] = DtypeOpt, tokenizer: Optional[str] = TokenizerOpt, device: str = DeviceOpt,
):
    """Build an influence index of the training data (fits EK-FAC factors first unless --factors)."""
    compression = CompressionConfig(budget=parse_size(budget, "--budget"), stage1_dim=stage1_dim, block_cost=block_cost, seed=seed,
                                    factor_share=factor_share, factor_block=factor_block)
    options = BuildOptions(text_field=text_field, split=split, max_length=max_length, modules=modules, compression=compression, shard_size=shard_size,
                           token_budget=token_budget, max_memory=max_memory or _B.max_memory, index_key=index_key, chunk=chunk, stride=stride, chat=chat)
    part = parse_part(shard)
    pipeline.build(model, data, out, factors=factors, options=options, shard=part, tokenizer=tokenizer, dtype=dtype, device=device)
    if part is not None:
        typer.echo(f"built part {part[0]}/{part[1]} in {out}; join the parts with `gradindex merge`")
    elif (out / "manifest.json").is_file() and os.environ.get("RANK", "0") == "0":
        typer.echo(pipeline.info(out).summary(out))


@command
def merge(
    parts: list[Path] = typer.Argument(..., help="Part folders built with --shard i/n."),
    out: Path = typer.Option(..., "--out", help="Index folder to write (may be one of the parts)."),
    max_memory: Optional[str] = MaxMemoryOpt,
    index_key: Optional[str] = IndexKeyOpt,
):
    """Join parts built with --shard into one index."""
    typer.echo(pipeline.merge(parts, out, max_memory=max_memory, index_key=index_key).summary(out))


@command
def add(
    index_dir: Path = IndexArg,
    data: str = DataOpt,
    model: Optional[str] = IndexModelOpt,
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column holding the text (default: the index's)."), split: Optional[str] = SplitOpt,
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Append rows to a built index with its own factors and compression (no rebuild). Re-run after a kill to finish."""
    generation = pipeline.info(index_dir).generation
    manifest = pipeline.add(index_dir, data, model=model, text_field=text_field, split=split, token_budget=token_budget, dtype=dtype, device=device)
    if manifest.generation == generation:
        typer.echo(f"nothing to add: {index_dir} already holds the rows of {data}")
        return
    typer.echo(manifest.summary(index_dir))
    if manifest.additions and (drift := manifest.additions[-1].drift) is not None:
        advice = ("the factors fit these rows as well as the built ones" if drift < DRIFT_REFIT else
                  "the factors are stale for these rows: rebuild (refit the factors) for exact scores that reflect them")
        typer.echo(f"factor drift {drift:.2f} (added rows' median self-influence ÷ the built rows'; refit advised from {DRIFT_REFIT:g}): {advice}")


@command
def remove(
    index_dir: Path = IndexArg,
    rows: Optional[str] = typer.Option(None, "--rows", help="Row ids to remove, e.g. 3,17."),
    where: Optional[str] = typer.Option(None, "--where", help="Remove the rows matching COLUMN OP VALUE, e.g. \"source = 'a.jsonl'\"."),
):
    """Tombstone rows: they never appear in any answer again (`gradindex compact` rewrites the index without them)."""
    manifest, count = pipeline.remove(index_dir, rows=rows, where=where)
    typer.echo(f"removed {count} rows ({manifest.n_removed} removed in all, {manifest.n_live} remain)")


@command
def compact(index_dir: Path = IndexArg):
    """Rewrite an index without its removed rows (rows numbered anew; each keeps its source and offset)."""
    typer.echo(pipeline.compact(index_dir).summary(index_dir))


@command
def info(index_dir: Path = IndexArg, as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")):
    """Print an index's manifest."""
    manifest = pipeline.info(index_dir)
    typer.echo(json.dumps(manifest.to_dict(), indent=1) if as_json else manifest.summary(index_dir))


@command
def verify(index_dir: Path = IndexArg):
    """Re-hash every file of an index against its manifest."""
    problems = pipeline.verify(index_dir)
    for p in problems:
        typer.echo(f"error: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{index_dir}: every file matches the manifest")


@command
def layers(
    model: str = ModelArg,
    modules: str = ModulesOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    dtype: Optional[str] = DtypeOpt, tokenizer: Optional[str] = TokenizerOpt,
):
    """Which modules a fit would track (a dry run): name, kind, shape, and the share of the blocks' weights covered."""
    found = pipeline.layers(model, modules=modules, tokenizer=tokenizer, dtype=dtype)
    width = max(len(d["name"]) for d in found["layers"])
    typer.echo(json.dumps(found) if as_json else "\n".join(
        [f"{d['name']:<{width}}  {d['kind']:<7} {d['d_out']} x {d['d_in']}" for d in found["layers"]]
        + [f"{len(found['layers'])} layers (d_out x d_in, a bias as one more input), tracked_fraction {found['tracked_fraction']:.3f}"]))
    if found["note"] and not as_json:
        typer.echo(f"warning: {found['note']}", err=True)


from cli import ask, check  # noqa: E402,F401  (registers the verbs that ask a built index, and validate)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
