"""The ``gradindex`` verbs that ask a built index: ``query`` (here or through ``--server``), ``serve``,
``report``, ``eval`` and ``outliers``. Registered on the shared app by ``cli.main``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.args import (
    _OUTLIERS, _Q, DampingOpt, DampingScaleOpt, DeviceOpt, DtypeOpt, IndexArg, IndexModelOpt, K1Opt, K2Opt, KOpt, NprobeOpt, PromptOpt, CompletionOpt,
    QueriesOpt, command,
)
from gradindex import pipeline
from gradindex.analysis import DEFAULT_SAMPLE
from gradindex.data import as_queries
from gradindex.options import Limits, QueryOptions
from gradindex.results import one_line

_L = Limits()
TokenOpt = typer.Option(None, "--token", help="Bearer token of the server (default: $GRADINDEX_TOKEN).")


@command
def query(
    index_dir: Optional[Path] = typer.Argument(None, metavar="[INDEX]", help="Index folder written by `gradindex build` (or --server)."),
    prompt: Optional[str] = PromptOpt,
    completion: Optional[str] = CompletionOpt,
    queries: Optional[Path] = QueriesOpt,
    k: int = KOpt,
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    nprobe: Optional[int] = NprobeOpt,
    opponents: bool = typer.Option(False, "--opponents", help="Most negative influence instead of most positive."),
    cosine: bool = typer.Option(False, "--cosine", help="Unit-normalised scores (divide by both gradients' whitened norms)."),
    per_token: bool = typer.Option(False, "--per-token", help="Token-wise influence inside each result."),
    distinct: bool = typer.Option(False, "--distinct", help="k distinct texts, each listing the rows of its copies, instead of k rows."),
    candidates: str = typer.Option(_Q.candidates, "--candidates", help="Texts rescored exactly: index (stage 2), tfidf (lexical) or hybrid (half each)."),
    damping: Optional[float] = DampingOpt,
    damping_scale: Optional[float] = DampingScaleOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: one JSON object per query."),
    model: Optional[str] = IndexModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
    server: Optional[str] = typer.Option(None, "--server", help="Ask a running `gradindex serve` at this URL instead of opening INDEX here."),
    token: Optional[str] = TokenOpt,
):
    """The training sequences with the largest influence on a completion."""
    options = QueryOptions(k=k, k1=k1, k2=k2, nprobe=nprobe, opponents=opponents, cosine=cosine, per_token=per_token,
                           damping=damping, damping_scale=damping_scale, candidates=candidates, distinct=distinct)
    for r in pipeline.query(index_dir, as_queries(queries, prompt=prompt, completion=completion), options=options, model=model, dtype=dtype,
                            device=device, server=server, token=token):
        typer.echo(json.dumps(r.to_dict()) if as_json else r.summary())


@command
def outliers(
    index_dir: Path = IndexArg,
    n: int = typer.Option(_OUTLIERS["n"], "-n", help="How many sequences to list."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sequence."),
    exact: bool = typer.Option(False, "--exact", help="Recompute their self-influence exactly (with the damping below) instead of the stored values."),
    damping: Optional[float] = DampingOpt,
    damping_scale: Optional[float] = DampingScaleOpt,
    model: Optional[str] = IndexModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """The training sequences of highest self-influence (unusual or memorised ones)."""
    for row, value, text in pipeline.outliers(index_dir, n, exact=exact, damping=damping, damping_scale=damping_scale, model=model, dtype=dtype, device=device):
        typer.echo(json.dumps({"row": row, "self_influence": value, "text": text}) if as_json else f"{value:12.5g}  row {row}  {one_line(text)}")


@command(name="eval")
def eval_(
    index_dir: Path = IndexArg,
    queries: Path = typer.Option(..., "--queries", help="jsonl of {\"prompt\", \"completion\"} objects."),
    k: int = typer.Option(_Q.k, "-k", "--k", help="Size of the top-k compared."),
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    nprobe: Optional[int] = NprobeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    model: Optional[str] = IndexModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Recall of each stage against brute-force exact scores, and query latency."""
    options = QueryOptions(k=k, k1=k1, k2=k2, nprobe=nprobe)
    report = pipeline.evaluate(index_dir, as_queries(queries), options=options, model=model, dtype=dtype, device=device)
    typer.echo(json.dumps(report.to_dict()) if as_json else report.summary())


@command
def report(
    index_dir: Path = IndexArg,
    prompt: str = typer.Option(..., "--prompt", help="The query's prompt."),
    completion: str = typer.Option(..., "--completion", help="The completion whose log-likelihood is explained."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (self-contained: no scripts, no external resources)."),
    k: int = typer.Option(_Q.k, "-k", "--k", help="Proponents and opponents shown."),
    exact_sparsity: bool = typer.Option(False, "--exact-sparsity", help="Sparsity from exact scores of every sequence (a pass over the training set) instead of the estimate."),
    sparsity_sample: int = typer.Option(DEFAULT_SAMPLE, "--sparsity-sample", help="Random sequences scored exactly for the sparsity estimate (besides the shortlists)."),
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    model: Optional[str] = IndexModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """One HTML page of a query's influence: top proponents and opponents with token heat maps and
    per-layer bars, and how concentrated the influence is over the training set."""
    path = pipeline.report(index_dir, prompt, completion, out, options=QueryOptions(k=k, k1=k1, k2=k2), exact_sparsity=exact_sparsity,
                           sparsity_sample=sparsity_sample, model=model, dtype=dtype, device=device)
    typer.echo(str(path))


@command
def serve(
    index_dir: Path = IndexArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --token."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port, printed)."),
    token: Optional[str] = typer.Option(None, "--token", help="Require this bearer token on every request (default: $GRADINDEX_TOKEN)."),
    max_batch: int = typer.Option(_L.max_batch, "--max-batch", help="Queries answered by one cascade pass (1: no request batching)."),
    max_wait_ms: float = typer.Option(_L.max_wait * 1000, "--max-wait-ms", help="How long a request waits for others to share its pass."),
    max_k: int = typer.Option(_L.max_k, "--max-k", help="Most results one query may ask for."),
    model: Optional[str] = IndexModelOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Serve an index over HTTP: a JSON API (/query, /query_many, /rows/ID, /info, /health, /docs) and a search page at /."""
    limits = Limits(max_batch=max_batch, max_wait=max_wait_ms / 1000, max_k=max_k)
    pipeline.serve(index_dir, host=host, port=port, token=token, limits=limits, model=model, dtype=dtype, device=device)
