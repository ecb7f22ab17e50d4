"""--tokenizer: a model whose folder has no tokenizer is built and queried with one from elsewhere, recorded in
the index so a later query needs no flag."""

import json
import shutil

from typer.testing import CliRunner

from cli.main import app
from tiny import build_args

runner = CliRunner()


def test_a_tokenizer_from_another_folder_is_used_and_recorded(ws, tmp_path):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for f in (ws / "model").iterdir():  # weights and config only
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, bare / f.name)
    missing = runner.invoke(app, ["layers", str(bare)])
    assert missing.exit_code == 2 and missing.output.startswith("error: cannot load tokenizer") and len(missing.output.splitlines()) == 1
    bad = runner.invoke(app, ["layers", str(bare), "--tokenizer", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "cannot load tokenizer" in bad.output
    assert runner.invoke(app, ["layers", str(bare), "--tokenizer", str(ws / "model")]).exit_code == 0

    args = build_args(ws, tmp_path / "idx", "--tokenizer", str(ws / "model"))
    args[args.index("build") + 1] = str(bare)
    built = runner.invoke(app, args)
    assert built.exit_code == 0, built.output
    assert json.loads((tmp_path / "idx" / "build.json").read_text())["tokenizer"] == str((ws / "model").resolve())
    answer = runner.invoke(app, ["query", str(tmp_path / "idx"), "--prompt", "the king", "--completion", " wrote a book", "--json"])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output.splitlines()[-1])["hits"]
