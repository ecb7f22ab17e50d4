"""The ``gradindex`` command line: a thin layer over :mod:`gradindex.pipeline`."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from gradindex.data import DEFAULT_TOKEN_BUDGET
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
        damping=damping, damping_scale=damping_scale, per_layer=per_layer, per_token=per_token, dtype=dtype, device=device,
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
