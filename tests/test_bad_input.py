"""The bad-input sweep over the index verbs: each case ends in one line naming the problem on stderr, exit
code 2, and the index exactly as it was. (Every bad-input test of the suite carries the ``bad_input`` mark:
``pytest -m bad_input`` runs them all and counts them.)"""

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from gradindex.files import writer_lock
from tiny import build_args

pytestmark = pytest.mark.bad_input
runner = CliRunner()
Q = ["--prompt", "music by", "--completion", " the old"]


def edit_manifest(change):
    def apply(idx: Path):
        manifest = json.loads((idx / "manifest.json").read_text())
        (idx / "manifest.json").write_text(json.dumps(change(manifest)))
    return apply


def flip(name):
    def apply(idx: Path):
        path = next(idx.glob(name))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return apply


def write(name, text):
    def apply(idx: Path):
        (idx.parent / name).write_text(text)
    return apply


# case → (how the copy of the index is spoilt first, or None; the arguments; what the one line must say)
CASES = {
    "manifest of a newer schema": (edit_manifest(lambda m: {**m, "schema_version": 99}), ["query", "{idx}", *Q], "newer than this gradindex reads"),
    "manifest missing a key": (edit_manifest(lambda m: {k: v for k, v in m.items() if k != "index"}), ["query", "{idx}", *Q], "incomplete or damaged"),
    "manifest a JSON list": (edit_manifest(lambda m: [m]), ["info", "{idx}"], "not a JSON object"),
    "manifest listing fewer shards": (edit_manifest(lambda m: {**m, "shards": m["shards"][:-1]}), ["query", "{idx}", *Q], "do not hold rows"),
    "manifest with overlapping shards": (edit_manifest(lambda m: {**m, "shards": [m["shards"][0], *m["shards"]][:len(m["shards"])]}),
                                         ["verify", "{idx}"], "do not hold rows"),
    "manifest not JSON": (lambda idx: (idx / "manifest.json").write_text("{"), ["query", "{idx}", *Q], "unreadable"),
    "removed rows damaged": (lambda idx: (runner.invoke(app, ["remove", str(idx), "--rows", "4"]), flip("removed.*.npy")(idx)),
                             ["query", "{idx}", *Q], "damaged"),
    "removed rows missing": (lambda idx: (runner.invoke(app, ["remove", str(idx), "--rows", "4"]), next(idx.glob("removed.*.npy")).unlink()),
                             ["query", "{idx}", *Q], "missing removed"),
    "a build not finished": (lambda idx: (idx / "manifest.json").unlink(), ["query", "{idx}", *Q], "is incomplete"),
    "no index there": (None, ["query", "{idx}/nothing", *Q], "no index at"),
    "k of zero": (None, ["query", "{idx}", *Q, "-k", "0"], "k must be"),
    "k beyond the index": (None, ["query", "{idx}", *Q, "-k", "1000"], "exceeds the 70 sequences"),
    "unknown candidate source": (None, ["query", "{idx}", *Q, "--candidates", "bm25"], "candidates must be one of"),
    "negative nprobe": (None, ["query", "{idx}", *Q, "--nprobe", "-5"], "nprobe must be a positive"),
    "NaN damping": (None, ["query", "{idx}", *Q, "--damping", "nan"], "damping must be a positive number"),
    "queries file missing": (None, ["query", "{idx}", "--queries", "{idx}/../none.jsonl"], "none.jsonl"),
    "queries file not JSON lines": (write("bad.jsonl", "{\"prompt\": \"a\"\n"), ["query", "{idx}", "--queries", "{idx}/../bad.jsonl"], "bad.jsonl"),
    "a prompt without a completion": (None, ["query", "{idx}", "--prompt", "music"], "completion"),
    "add: data missing": (None, ["add", "{idx}", "--data", "{idx}/../none.jsonl"], "none.jsonl"),
    "add: no such text field": (write("other.jsonl", "{\"body\": \"the king\"}\n"), ["add", "{idx}", "--data", "{idx}/../other.jsonl"],
                                "no text field 'text'"),
    "add: another model": (write("more.jsonl", "{\"text\": \"the king\"}\n"),
                           ["add", "{idx}", "--data", "{idx}/../more.jsonl", "--model", "{ws}/other_model"], "another model"),
    "add: no index there": (None, ["add", "{idx}/nothing", "--data", "{ws}/train.jsonl"], "no index at"),
    "compact: another writer holds the index": ("lock", ["compact", "{idx}"], "is being written by"),
    "add: another writer holds the index": ("lock", ["add", "{idx}", "--data", "{ws}/train.jsonl"], "is being written by"),
    "remove: another writer holds the index": ("lock", ["remove", "{idx}", "--rows", "1"], "is being written by"),
    "build: unreadable budget": (None, [*build_args(Path("{ws}"), Path("{idx}/../o"))[:-6], "--budget", "lots"], "budget"),
    "build: shard size zero": (None, [*build_args(Path("{ws}"), Path("{idx}/../o"))[:-2], "--shard-size", "0"], "shard size must be positive"),
}


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_on_an_index_is_one_line_and_changes_nothing(ws, tmp_path, case):
    spoil, args, message = CASES[case]
    idx = tmp_path / "idx"
    shutil.copytree(ws / "idx", idx)
    if callable(spoil):
        spoil(idx)
    before = snapshot(idx)
    args = [a.format(idx=idx, ws=ws) for a in map(str, args)]
    if spoil == "lock":
        with writer_lock(idx, "build"):
            result = runner.invoke(app, args)
    else:
        result = runner.invoke(app, args)
    # the error is one line, the last (datasets may have drawn a progress bar before it)
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and result.stderr.strip().endswith(errors[0]) and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert snapshot(idx) == before


def test_a_full_disk_during_a_build_is_one_line_and_the_re_run_finishes_it(ws, tmp_path):
    """A file-size limit stands in for a full disk: writes past it fail with EFBIG (SIGXFSZ ignored)."""
    out = tmp_path / "full"

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    command = [sys.executable, "-c", "from cli.main import app; app()", *map(str, build_args(ws, out))]
    failed = subprocess.run(command, capture_output=True, text=True, preexec_fn=limited, cwd=Path(__file__).parent.parent)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and lines[-1].startswith("error: cannot write") and "File too large" in lines[-1], failed.stderr
    assert "Traceback" not in failed.stderr and not (out / "manifest.json").exists()
    assert not list(out.rglob(".*.tmp"))  # the failed write left nothing half-written
    done = runner.invoke(app, build_args(ws, out))
    assert done.exit_code == 0, done.output
    for name in ("index.faiss", "shards/00003.codes.npy", "shards/00001.meta.parquet"):
        assert (out / name).read_bytes() == (ws / "idx" / name).read_bytes()


def test_a_read_only_index_answers_tfidf_queries_without_writing(ws, tmp_path, monkeypatch):
    """Where the TF-IDF must be rebuilt and cannot be written back (a read-only mount), the query still answers."""
    import gradindex.candidates
    from gradindex import GradIndexError
    from gradindex.search import GradIndex

    idx = tmp_path / "idx"
    shutil.copytree(ws / "idx", idx)
    shutil.rmtree(idx / "lexical")

    def refuse(*_, **__):
        raise GradIndexError(f"cannot write {idx / 'lexical'}: Read-only file system")

    monkeypatch.setattr(gradindex.candidates, "write_lexical", refuse)
    hits = GradIndex.open(idx).query("music by", " the old", k=3, candidates="tfidf").hits
    expected = GradIndex.open(ws / "idx").query("music by", " the old", k=3, candidates="tfidf").hits
    assert [h.row for h in hits] == [h.row for h in expected] and not (idx / "lexical").exists()
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], rtol=1e-6)
