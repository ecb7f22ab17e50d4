"""``gradindex validate``: is the influence true? LDS and leave-top-k-out by retraining (:mod:`gradindex.validation`).
Registered on the shared app by ``cli.main``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.args import DeviceOpt, ModelArg, TextFieldOpt, command
from gradindex import pipeline
from gradindex.data import load_queries
from gradindex.errors import GradIndexError
from gradindex.preconditioners import PRECONDITIONERS
from gradindex.validation import ValidationConfig

_V = ValidationConfig()


@command
def validate(
    model: str = ModelArg,
    init: str = typer.Option(..., "--init", help="The weights the model was trained from (same architecture and tokenizer)."),
    recipe: Path = typer.Option(..., "--recipe", help="recipe.json: how it was trained (gradindex.training.TrainRecipe; the example writes one)."),
    data: str = typer.Option(..., "--data", help="The training data it was trained on, in training order."),
    queries: Path = typer.Option(..., "--queries", help="jsonl of {\"prompt\", \"completion\"} objects; an optional \"group\" field splits the report."),
    out: Path = typer.Option(..., "--out", help="Folder for the retrained runs (cached: a rerun continues) and validation.json."),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"Preconditioners compared, of {', '.join(PRECONDITIONERS)} (default: all; adam "
                                          "with --optimizer-state). A random baseline is always added."),
    subsets: int = typer.Option(_V.subsets, "--subsets", help="Random subsets retrained on for the LDS."),
    fraction: float = typer.Option(_V.fraction, "--fraction", help="Share of the rows in each subset."),
    leave_out: str = typer.Option(",".join(map(str, _V.leave_out)), "--leave-out", help="k of leave-top-k-out, comma-separated ('' for none)."),
    leave_out_queries: Optional[int] = typer.Option(None, "--leave-out-queries", help="Leave-top-k-out for the first N queries only (each is a retraining per method and k)."),
    factors: Optional[Path] = typer.Option(None, "--factors", help="EK-FAC factors of the model (default: fitted on --data)."),
    optimizer_state: Optional[Path] = typer.Option(None, "--optimizer-state", help="torch.save(optimizer.state_dict()) of its Adam/AdamW (for the adam preconditioner)."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index of --data (one row per sequence): its answers are left out too."),
    seed: int = typer.Option(_V.seed, "--seed", help="Draws the subsets and the random baseline."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
):
    """LDS and leave-top-k-out of each preconditioner's scores, by retraining the model on subsets of its data."""
    try:
        ks = tuple(int(k) for k in leave_out.split(",") if k.strip())
    except ValueError:
        raise GradIndexError(f"--leave-out must be comma-separated integers, got {leave_out!r}") from None
    config = ValidationConfig(subsets=subsets, fraction=fraction, seed=seed, leave_out=ks, leave_out_queries=leave_out_queries)
    asked = load_queries(queries)
    groups = [json.loads(line).get("group", "all") for line in queries.read_text().splitlines() if line.strip()]
    report = pipeline.validate(model, init, recipe, data, asked, out, methods=methods, config=config, factors=factors,
                               optimizer_state=optimizer_state, index=index, groups=groups, text_field=text_field,
                               device=device)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{report['queries']} queries, {report['subsets']} subsets of {report['fraction']:.0%} of {report['rows']} rows "
               f"({report['retrained_now']} retrained now); {out / 'validation.json'}")
    header = "method     LDS [95% CI]            " + "".join(f"  top{k}-out" for k in ks)
    typer.echo(header)
    for name, e in report["preconditioners"].items():
        lds = "(ranking only)" if "lds" not in e else "n/a" if e["lds"] is None or e["lds_ci"][0] is None else \
            f"{e['lds']:+.3f} [{e['lds_ci'][0]:+.2f}, {e['lds_ci'][1]:+.2f}]"
        drops = "".join(f"  {e[f'leave_top{k}_out']:+9.3f}" if e[f"leave_top{k}_out"] is not None else "          -" for k in ks)
        typer.echo(f"{name:10s} {lds:24s}{drops}")
