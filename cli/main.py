"""The ``gradindex`` command line: a thin layer over :mod:`gradindex.pipeline`."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from gradindex.compress import CompressionConfig
from gradindex.data import DEFAULT_TOKEN_BUDGET
from gradindex.search import DEFAULT_K1, DEFAULT_K2
from gradindex.errors import GradIndexError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Which training sequences made the model say this?")

ModelArg = typer.Argument(..., help="Hugging Face causal LM: a local folder or a hub name.")
DataOpt = typer.Option(..., "--data", help="Training data: a json/jsonl/parquet/csv/txt file, a saved dataset folder, or a hub name.")
TextFieldOpt = typer.Option("text", "--text-field", help="Column holding the training text.")
MaxLengthOpt = typer.Option(None, "--max-length", help="Truncate training sequences to this many tokens (default: the model's context, at most 2048).")
TokenBudgetOpt = typer.Option(DEFAULT_TOKEN_BUDGET, "--token-budget", help="Padded tokens per batch (raise it on a GPU).")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype: float32, float64, bfloat16, float16 (default: as saved).")
DeviceOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")


def friendly_errors(command):
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GradIndexError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@friendly_errors
def fit(
    model: str = ModelArg,
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Folder to write factors.safetensors and factors.json to."),
    text_field: str = TextFieldOpt,
    max_length: Optional[int] = MaxLengthOpt,
    modules: str = typer.Option("mlp", "--modules", help="'mlp' (default), 'all' linear layers in the blocks, or a regex over module names."),
    empirical_fisher: bool = typer.Option(False, "--empirical-fisher", help="Use the data's labels instead of labels sampled from the model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled labels."),
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Fit EK-FAC factors of MODEL on the training data."""
    from gradindex import pipeline

    factors = pipeline.fit(
        model, data, out=out, text_field=text_field, max_length=max_length, modules=modules,
        fisher="empirical" if empirical_fisher else "true", seed=seed, token_budget=token_budget, dtype=dtype, device=device,
    )
    c = factors.config
    if c.n_truncated:
        typer.echo(f"truncated {c.n_truncated} of {c.n_sequences} sequences to {c.max_length} tokens", err=True)
    typer.echo(f"fitted {len(factors.layers)} layers on {c.n_sequences} sequences ({c.n_tokens} tokens) in {c.fit_seconds:.1f}s -> {out}")


@app.command()
@friendly_errors
def scores(
    model: str = ModelArg,
    factors: Path = typer.Option(..., "--factors", help="Folder written by `gradindex fit`."),
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Where to write the n_query × n_train float32 matrix (.npy)."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="jsonl of {\"prompt\", \"completion\"} objects."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="A single query's prompt (with --completion)."),
    completion: Optional[str] = typer.Option(None, "--completion", help="A single query's completion, the tokens measured."),
    text_field: str = TextFieldOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate training sequences (default: as the factors were fitted)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Absolute damping λ for every layer (overrides --damping-scale)."),
    damping_scale: Optional[float] = typer.Option(None, "--damping-scale", help="λ = scale × mean eigenvalue per layer (default 0.1)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also write per-layer scores (<out>.per_layer.npz)."),
    per_token: bool = typer.Option(False, "--per-token", help="Also write per-token scores (<out>.per_token.npz, one array per training row)."),
    query_rank: Optional[int] = typer.Option(None, "--query-rank", help="Hold each query's preconditioned gradient as a rank-r SVD (less memory for many queries; approximate)."),
    top: int = typer.Option(3, "--top", help="Print this many top training rows per query."),
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Exact EK-FAC influence of every training sequence on every query."""
    from gradindex import pipeline
    from gradindex.data import Query

    if (queries is None) == (prompt is None and completion is None):
        raise GradIndexError("give either --queries FILE or --prompt and --completion")
    if queries is None:
        if prompt is None or completion is None:
            raise GradIndexError("--prompt and --completion go together")
        query_list = [Query(prompt, completion)]
    else:
        query_list = queries
    result = pipeline.score(
        model, factors, data, query_list, text_field=text_field, max_length=max_length, token_budget=token_budget,
        damping=damping, damping_scale=damping_scale, per_layer=per_layer, per_token=per_token, query_rank=query_rank,
        dtype=dtype, device=device,
    )
    if result.n_truncated:
        typer.echo(f"truncated {result.n_truncated} training sequences to the maximum length", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, result.scores)
    stem = out.with_suffix("")
    if result.per_layer is not None:
        np.savez(f"{stem}.per_layer.npz", **result.per_layer)
    if result.per_token is not None:
        np.savez(f"{stem}.per_token.npz", **{str(i): t for i, t in enumerate(result.per_token)})
    typer.echo(f"scores {result.scores.shape[0]} × {result.scores.shape[1]} -> {out}")
    for q, row in enumerate(result.scores):
        best = np.argsort(-row)[:top]
        typer.echo(f"query {q}: " + ", ".join(f"row {i} ({row[i]:.4g})" for i in best))


IndexArg = typer.Argument(..., help="Index folder written by `gradindex build`.")
K1Opt = typer.Option(None, "--k1", help=f"Stage-1 (FAISS) candidates (default {DEFAULT_K1}).")
K2Opt = typer.Option(None, "--k2", help=f"Stage-2 (low-rank) survivors rescored exactly (default {DEFAULT_K2}).")
QueryRankOpt = typer.Option(None, "--rank", help="Stage-2 rank at query time, at most the built one (lower: faster, coarser).")
NprobeOpt = typer.Option(None, "--nprobe", help="IVF lists searched (IVF indexes only; default: recorded in the index).")
_C = CompressionConfig()


def _parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise GradIndexError(f"cannot read memory size {text!r} (e.g. 512M, 4G)") from None


def _parse_shard(text: str | None):
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise GradIndexError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    return i, n


@app.command()
@friendly_errors
def build(
    model: str = ModelArg,
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", help="Index folder, e.g. indexes/NAME. Re-running the same command resumes it."),
    factors: Optional[Path] = typer.Option(None, "--factors", help="Factors from `gradindex fit` (default: fit them first)."),
    text_field: str = TextFieldOpt,
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate training sequences (default: as the factors were fitted, else the model's context)."),
    modules: str = typer.Option("mlp", "--modules", help="Layers, when fitting factors here: 'mlp', 'all' or a regex."),
    stage1: str = typer.Option(_C.stage1, "--stage1", help="Stage-1 vectors: 'sketch' (CountSketch) or 'topl' (entries of largest eigenvalue)."),
    stage1_dim: int = typer.Option(_C.stage1_dim, "--stage1-dim", help="Stage-1 entries per layer."),
    stage1_damping_scale: float = typer.Option(_C.stage1_damping_scale, "--stage1-damping-scale", help="Stage-1 whitening damping, × mean eigenvalue (heavier than exact scoring's)."),
    rank: int = typer.Option(_C.rank, "--rank", help="Stage-2 rank of each layer's whitened gradient."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sketch and the randomized SVD."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Rows per shard: the unit of resumption."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Build only part i of n (i/n); join the parts with `gradindex merge`."),
    max_memory: str = typer.Option("4G", "--max-memory", help="Memory budget of the FAISS index; decides exact or IVF."),
    index_key: Optional[str] = typer.Option(None, "--index-key", help="FAISS factory string overriding the automatic choice, e.g. 'IVF1024,SQ8'."),
    token_budget: int = TokenBudgetOpt,
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """Build an influence index of the training data (fits EK-FAC factors first unless --factors)."""
    from gradindex.build import build as run_build
    from gradindex.compress import CompressionConfig

    compression = CompressionConfig(stage1=stage1, stage1_dim=stage1_dim, stage1_damping_scale=stage1_damping_scale, rank=rank, seed=seed)
    part = _parse_shard(shard)
    run_build(
        model, data, out, factors=factors, text_field=text_field, max_length=max_length, modules=modules, compression=compression,
        shard_size=shard_size, shard=part, token_budget=token_budget, max_memory=_parse_size(max_memory), index_key=index_key,
        dtype=dtype, device=device,
    )
    if part is not None:
        typer.echo(f"built part {part[0]}/{part[1]} in {out}; join the parts with `gradindex merge`")
    elif (out / "manifest.json").is_file() and os.environ.get("RANK", "0") == "0":
        _print_info(out)


@app.command()
@friendly_errors
def merge(
    parts: list[Path] = typer.Argument(..., help="Part folders built with --shard i/n."),
    out: Path = typer.Option(..., "--out", help="Index folder to write (may be one of the parts)."),
    max_memory: str = typer.Option("4G", "--max-memory", help="Memory budget of the FAISS index."),
    index_key: Optional[str] = typer.Option(None, "--index-key", help="FAISS factory string overriding the automatic choice."),
):
    """Join parts built with --shard into one index."""
    from gradindex.build import merge as run_merge

    run_merge(parts, out, max_memory=_parse_size(max_memory), index_key=index_key)
    _print_info(out)


def _print_info(root: Path) -> None:
    from gradindex.store import load_manifest

    m = load_manifest(root)
    c, b = m["compression"], m["bytes_per_sequence"]
    typer.echo(f"index {root}: {m['n_rows']} sequences, model {m['model']} ({len(m['layers'])} layers), built {m['created']}")
    typer.echo(f"  stage 1: {c['stage1']} {m['vector_dim']} dims (damping {c['stage1_damping_scale']} × mean eigenvalue), FAISS {m['index']['key']}")
    typer.echo(f"  stage 2: rank {c['rank']} factors, {m['factor_dim']} values per sequence; storage {c['dtype']}")
    typer.echo("  bytes per sequence: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in b.items()))
    typer.echo(f"  model hash {m['model_hash']}, tokenizer hash {m['tokenizer_hash']}, factors sha256 {m['factors_hash'][:16]}…")


@app.command()
@friendly_errors
def info(index: Path = IndexArg, as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")):
    """Print an index's manifest."""
    import json

    from gradindex.store import load_manifest

    if as_json:
        typer.echo(json.dumps(load_manifest(index), indent=1))
    else:
        _print_info(index)


@app.command()
@friendly_errors
def verify(index: Path = IndexArg):
    """Re-hash every file of an index against its manifest."""
    from gradindex.store import verify as run_verify

    problems = run_verify(index)
    if problems:
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{index}: every file matches the manifest")


def _queries(queries: Optional[Path], prompt: Optional[str], completion: Optional[str]):
    from gradindex.data import Query, load_queries

    if (queries is None) == (prompt is None and completion is None):
        raise GradIndexError("give either --queries FILE or --prompt and --completion")
    if queries is None:
        if prompt is None or completion is None:
            raise GradIndexError("--prompt and --completion go together")
        return [Query(prompt, completion)]
    return load_queries(queries)


@app.command()
@friendly_errors
def query(
    index: Path = IndexArg,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The query's prompt."),
    completion: Optional[str] = typer.Option(None, "--completion", help="The completion whose log-likelihood is explained."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="jsonl of {\"prompt\", \"completion\"} objects, instead of one query."),
    k: int = typer.Option(10, "-k", "--k", help="Results per query."),
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    rank: Optional[int] = QueryRankOpt,
    nprobe: Optional[int] = NprobeOpt,
    opponents: bool = typer.Option(False, "--opponents", help="Most negative influence instead of most positive."),
    cosine: bool = typer.Option(False, "--cosine", help="Unit-normalised scores (divide by both gradients' whitened norms)."),
    per_token: bool = typer.Option(False, "--per-token", help="Token-wise influence inside each result."),
    distinct: bool = typer.Option(False, "--distinct", help="k distinct texts, each listing the rows of its copies, instead of k rows."),
    candidates: str = typer.Option("index", "--candidates", help="Texts rescored exactly: index (stage 2), tfidf (lexical) or hybrid (half each)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Absolute damping of the exact rerank."),
    damping_scale: Optional[float] = typer.Option(None, "--damping-scale", help="Damping of the exact rerank, × mean eigenvalue (default 0.1)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: one JSON object per query."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of the path recorded in the index (same weights)."),
    dtype: Optional[str] = DtypeOpt,
    device: str = DeviceOpt,
):
    """The training sequences with the largest influence on a completion."""
    import json
    from dataclasses import asdict

    from gradindex.search import GradIndex

    query_list = _queries(queries, prompt, completion)
    opened = GradIndex.open(index, model=model, dtype=dtype, device=device)
    results = opened.query_many(query_list, k, k1=k1, k2=k2, rank=rank, nprobe=nprobe, opponents=opponents, cosine=cosine,
                                per_token=per_token, candidates=candidates, distinct=distinct, damping=damping, damping_scale=damping_scale)
    for r in results:
        if as_json:
            typer.echo(json.dumps({k_: v for k_, v in asdict(r).items() if k_ != "trace"}))
            continue
        kind = "opponents" if opponents else "proponents"
        typer.echo(f"{r.prompt!r} → {r.completion!r}: top {len(r.hits)} {kind} ({r.seconds['total'] * 1000:.0f} ms)")
        for rank_, h in enumerate(r.hits, 1):
            text = " ".join(h.text.split())
            copies = f" (×{len(h.copies) + 1})" if h.copies else ""
            typer.echo(f"{rank_:3d}. {h.score:+.4g}  row {h.row}{copies}  {text[:100]}{'…' if len(text) > 100 else ''}")
            if per_token and h.tokens:
                best = np.argsort(-np.abs(h.token_scores))[:5]
                typer.echo("       tokens: " + ", ".join(f"{h.tokens[t]!r} {h.token_scores[t]:+.3g}" for t in sorted(best)))


@app.command()
@friendly_errors
def outliers(
    index: Path = IndexArg,
    n: int = typer.Option(20, "-n", help="How many sequences to list."),
    exact: bool = typer.Option(False, "--exact", help="Recompute their self-influence exactly (with the damping below) instead of the stored values."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Absolute damping of the exact recomputation."),
    damping_scale: Optional[float] = typer.Option(None, "--damping-scale", help="Damping of the exact recomputation, × mean eigenvalue."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sequence."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of the recorded path."),
):
    """The training sequences of highest self-influence (unusual or memorised ones)."""
    import json

    from gradindex.search import GradIndex

    for row, value, text in GradIndex.open(index, model=model).outliers(n, exact=exact, damping=damping, damping_scale=damping_scale):
        if as_json:
            typer.echo(json.dumps({"row": row, "self_influence": value, "text": text}))
        else:
            flat = " ".join(text.split())
            typer.echo(f"{value:12.5g}  row {row}  {flat[:100]}{'…' if len(flat) > 100 else ''}")


@app.command(name="eval")
@friendly_errors
def eval_(
    index: Path = IndexArg,
    queries: Path = typer.Option(..., "--queries", help="jsonl of {\"prompt\", \"completion\"} objects."),
    k: int = typer.Option(10, "-k", "--k", help="Size of the top-k compared."),
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    rank: Optional[int] = QueryRankOpt,
    nprobe: Optional[int] = NprobeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of the recorded path."),
    device: str = DeviceOpt,
):
    """Recall of each stage against brute-force exact scores, and query latency."""
    import json

    from gradindex.evaluate import evaluate
    from gradindex.search import GradIndex

    report = evaluate(GradIndex.open(index, model=model, device=device), queries, k, k1=k1, k2=k2, rank=rank, nprobe=nprobe)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(f"{report.n_queries} queries, {report.n_rows} sequences, k={report.k}, k1={report.k1}, k2={report.k2}")
    typer.echo(f"{'':12s}{'recall@k':>10s}{'in stage 1':>12s}{'in stage 2':>12s}{'in TF-IDF':>11s}{'in hybrid':>11s}"
               f"{'ρ stage 1':>11s}{'ρ stage 2':>11s}")
    for name, side in (("proponents", report.proponents), ("opponents", report.opponents)):
        typer.echo(f"{name:12s}{side.recall_at_k:10.3f}{side.stage1_recall:12.3f}{side.stage2_recall:12.3f}"
                   f"{side.tfidf_recall:11.3f}{side.hybrid_recall:11.3f}{side.stage1_spearman:11.3f}{side.stage2_spearman:11.3f}")
    typer.echo(f"(stage 2, TF-IDF and hybrid: the exact top-{report.k} among {report.k2} texts each)")
    stages = ", ".join(f"{s} {v * 1000:.1f}" for s, v in report.stage_seconds.items())
    typer.echo(f"latency p50 {report.latency_p50 * 1000:.1f} ms, p95 {report.latency_p95 * 1000:.1f} ms (mean ms: {stages})")
    typer.echo(f"brute-force exact: {report.brute_force_seconds * 1000:.1f} ms per query (all queries in one pass); "
               f"p50 speed-up {report.speedup_p50:.1f}×")


@app.command()
@friendly_errors
def report(
    index: Path = IndexArg,
    prompt: str = typer.Option(..., "--prompt", help="The query's prompt."),
    completion: str = typer.Option(..., "--completion", help="The completion whose log-likelihood is explained."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (self-contained: no scripts, no external resources)."),
    k: int = typer.Option(10, "-k", "--k", help="Proponents and opponents shown."),
    exact_sparsity: bool = typer.Option(False, "--exact-sparsity", help="Sparsity from exact scores of every sequence (a pass over the training set) instead of the estimate."),
    sparsity_sample: int = typer.Option(1000, "--sparsity-sample", help="Random sequences scored exactly for the sparsity estimate (besides the shortlists)."),
    k1: Optional[int] = K1Opt,
    k2: Optional[int] = K2Opt,
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of the recorded path (same weights)."),
):
    """One HTML page of a query's influence: top proponents and opponents with token heat maps and
    per-layer bars, and how concentrated the influence is over the training set."""
    from gradindex.report import write_report
    from gradindex.search import GradIndex

    path = write_report(GradIndex.open(index, model=model), prompt, completion, out, k=k, exact_sparsity=exact_sparsity,
                        sparsity_sample=sparsity_sample, k1=k1, k2=k2)
    typer.echo(str(path))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
