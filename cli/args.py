"""The pieces every ``gradindex`` verb shares: the typer app, its arguments and options (defaults are the
library's own: ``BuildOptions``, ``QueryOptions``, ``CompressionConfig`` and the façade's signatures), and
``command``, which turns a ``GradIndexError`` into one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import inspect

import typer

from gradindex import pipeline
from gradindex.codeplan import CompressionConfig
from gradindex.errors import GradIndexError
from gradindex.options import DEFAULT_K1, DEFAULT_K2, BuildOptions, QueryOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Which training sequences made the model say this?")
_B, _Q, _C = BuildOptions(), QueryOptions(), CompressionConfig()
_FIT, _OUTLIERS = ({name: p.default for name, p in inspect.signature(f).parameters.items()} for f in (pipeline.fit, pipeline.outliers))

ModelArg = typer.Argument(..., help="Hugging Face causal LM: a local folder or a hub name.")
DataOpt = typer.Option(..., "--data", help="Training data: a json/jsonl/parquet/csv/txt file, a saved dataset folder, or a hub name.")
TextFieldOpt = typer.Option(_B.text_field, "--text-field", help="Column holding the training text.")
ChatOpt = typer.Option(False, "--chat", help="The text field holds chat messages ([{role, content}, …]), rendered with the tokenizer's chat template.")
SplitOpt = typer.Option(None, "--split", help="Split of data that has several (default: train, or the only one).")
TokenBudgetOpt = typer.Option(_B.token_budget, "--token-budget", help="Padded tokens per batch (raise it on a GPU).")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype: float32, float64, bfloat16, float16 (default: as saved).")
ModulesOpt = typer.Option(_B.modules, "--modules", help="Layers to track: 'auto' (default: 'lora' for a LoRA model, else 'mlp'), "
                          "'mlp', 'lora', 'all' linear layers in the blocks, or a regex over module names.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Tokenizer folder or hub name, when not the model's own (an index records it).")
DeviceOpt = typer.Option(_FIT["device"], "--device", help="torch device, e.g. cpu or cuda.")
IndexArg = typer.Argument(..., metavar="INDEX", help="Index folder written by `gradindex build`.")
IndexModelOpt = typer.Option(None, "--model", help="Load the model from here instead of the path recorded in the index (same weights).")
PromptOpt = typer.Option(None, "--prompt", help="The query's prompt.")
CompletionOpt = typer.Option(None, "--completion", help="The completion whose log-likelihood is explained.")
QueriesOpt = typer.Option(None, "--queries", help="jsonl of {\"prompt\", \"completion\"} objects, instead of one query.")
KOpt = typer.Option(_Q.k, "-k", "--k", help="Results per query.")
K1Opt = typer.Option(None, "--k1", help=f"Stage-1 (FAISS) candidates (default {DEFAULT_K1}).")
K2Opt = typer.Option(None, "--k2", help=f"Distinct texts rescored exactly after stage 2 (default {DEFAULT_K2}).")
NprobeOpt = typer.Option(None, "--nprobe", help="IVF lists searched (IVF indexes only; default: recorded in the index).")
DampingOpt = typer.Option(None, "--damping", help="Absolute damping λ of the exact scores (overrides --damping-scale).")
DampingScaleOpt = typer.Option(None, "--damping-scale", help="Damping of the exact scores, × mean eigenvalue (default 0.1).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help=f"Memory budget of the FAISS index, e.g. 512M (default {_B.max_memory // 2**30}G); decides exhaustive or IVF.")
IndexKeyOpt = typer.Option(None, "--index-key", help="FAISS factory string overriding the automatic choice, e.g. 'IVF1024,SQ8'.")


def command(function=None, *, name: str | None = None):
    """A CLI verb whose bad input ends in one line on stderr and exit code 2, never a traceback."""

    def register(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except GradIndexError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        return app.command(name=name)(wrapper)

    return register(function) if function is not None else register
