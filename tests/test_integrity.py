"""What an index guarantees to the people who share it: concurrent use equals sequential use, and damaged
or odd input ends in one clear line instead of a wrong answer."""

import json
import random
import shutil
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()

WORDS = "the king of the north wrote a book music by old composer red blue river".split()


def mixed_queries(n: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        options = dict(k=3, opponents=i % 2 == 1, per_token=i % 3 == 0, cosine=i % 5 == 0, distinct=i % 7 == 0,
                       candidates=("index", "tfidf", "hybrid")[i % 3], k1=rng.choice([8, 30]), k2=rng.choice([4, 10]))
        jobs.append((prompt, completion, options))
    return jobs


def answer(index, job) -> list:
    result = index.query(job[0], job[1], **job[2])
    return [(h.row, h.score, h.approx_score, tuple(h.token_scores or ()), tuple(h.copies)) for h in result.hits] + [result.expected_missed]


def test_one_index_shared_by_8_threads_answers_exactly_as_sequentially(index):
    flags = [p.requires_grad for p in index.lm.model.parameters()]
    jobs = mixed_queries(800)  # 8 threads × 100 queries
    sequential = [answer(index, job) for job in jobs]
    concurrent: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        for i in range(t, len(jobs), 8):
            try:
                concurrent[i] = answer(index, jobs[i])
            except BaseException as e:  # noqa: BLE001 - every failure is reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert concurrent == sequential
    assert [p.requires_grad for p in index.lm.model.parameters()] == flags  # nothing left frozen behind
    assert np.isfinite([row[1] for a in sequential for row in a[:-1]]).all()


# -- damaged files: refused before an answer ------------------------------------------------------

def damaged_copy(ws, tmp_path, name: str, where: str = "middle"):
    """A copy of the tiny index with one byte of ``name`` flipped (in its middle, or its header)."""
    copy = tmp_path / "copy"
    shutil.copytree(ws / "idx", copy)
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if where == "middle" else 20] ^= 0xFF
    path.write_bytes(bytes(data))
    return copy


def ask(path, *extra):
    return runner.invoke(app, ["query", str(path), "--prompt", "music by", "--completion", " the old", "--k1", "70", "--k2", "70", *extra])


@pytest.mark.bad_input
@pytest.mark.parametrize("name,where", [
    ("factors/factors.safetensors", "middle"), ("factors/factors.json", "middle"), ("index.faiss", "middle"),
    ("shards/00002.codes.npy", "middle"), ("shards/00002.codes.npy", "header"), ("shards/00001.meta.parquet", "middle"),
    ("shards/00001.meta.parquet", "header"),
])
def test_one_flipped_byte_in_any_artifact_is_refused_in_one_line(ws, tmp_path, name, where):
    result = ask(damaged_copy(ws, tmp_path, name, where))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "damaged" in result.output or "cannot read" in result.output


@pytest.mark.bad_input
def test_an_edited_factors_json_is_refused(ws, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ws / "idx", copy)
    config = copy / "factors" / "factors.json"
    config.write_text(config.read_text().replace('"damping_scale": 0.1', '"damping_scale": 0.7'))
    assert '"damping_scale": 0.7' in config.read_text()
    result = ask(copy)
    assert result.exit_code == 2 and "factors/factors.json: sha256 differs" in result.output


def test_a_damaged_tfidf_is_rebuilt_from_the_metadata_not_used(ws, tmp_path):
    before = ask(ws / "idx", "--candidates", "tfidf", "--json")
    copy = damaged_copy(ws, tmp_path, "lexical/matrix.npz")
    after = ask(copy, "--candidates", "tfidf", "--json")
    assert before.exit_code == after.exit_code == 0 and json.loads(after.output)["hits"] == json.loads(before.output)["hits"]
    assert (copy / "lexical" / "matrix.npz").read_bytes() == (ws / "idx" / "lexical" / "matrix.npz").read_bytes()


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside.npy", "shards/../../x"])
def test_a_manifest_cannot_name_a_file_outside_the_index(ws, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(ws / "idx", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["files"]["codes"]["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for command in (["verify", str(copy)], ["info", str(copy)], ["query", str(copy), "--prompt", "a", "--completion", " b"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "points outside the index folder" in result.output, (command, result.output)


# -- bad input: one line naming the problem -------------------------------------------------------

from gradindex import GradIndexError, Query  # noqa: E402
from gradindex.files import writer_lock  # noqa: E402

API_CASES = {
    "no queries given": lambda i: i.query_many([]),
    "got dict": lambda i: i.query_many({"prompt": "a", "completion": " b"}),
    "completion must be text, got NoneType": lambda i: i.query("music", None),
    "completion must be text, got int": lambda i: i.query("music", 42),
    "k1 must be a positive": lambda i: i.query("music", " the", k1=0),
    "nprobe must be a positive": lambda i: i.query("music", " the", nprobe=-5),
    "damping must be a positive number, got nan": lambda i: i.query("music", " the", damping=float("nan")),
    "damping must be a positive number, got -1": lambda i: i.query("music", " the", damping=-1.0),
    "damping_scale must be a positive": lambda i: i.query("music", " the", damping_scale=0.0),
    "rows must be whole numbers": lambda i: i.all_scores([Query("music", " the")], rows=[0, 10**6]),
    "rows must be whole numbers from 0": lambda i: i.all_scores([Query("music", " the")], rows=[-1]),
    "gives damping": lambda i: i.factors.damping(i.factors.specs[0].name, damping_scale=-1.0),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("message", list(API_CASES))
def test_bad_api_input_is_one_clear_error(index, message):
    with pytest.raises(GradIndexError, match=message.replace("(", r"\(")):
        API_CASES[message](index)


@pytest.mark.bad_input
def test_bad_build_options_are_refused_before_any_shard(ws, tmp_path):
    from tiny import build_args

    for extra, message in ((["--max-memory", "0"], "max memory must be a positive size"),
                           (["--index-key", "Garbage,,12"], "could not parse index string")):
        result = runner.invoke(app, build_args(ws, tmp_path / "o", *extra))
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not list((tmp_path / "o" / "shards").glob("*.npy"))
    (tmp_path / "afile").write_text("keep me")
    result = runner.invoke(app, build_args(ws, tmp_path / "afile"))
    assert result.exit_code == 2 and result.output.startswith("error: cannot write") and (tmp_path / "afile").read_text() == "keep me"
    cuda = runner.invoke(app, ["query", str(ws / "idx"), "--prompt", "a", "--completion", " b", "--device", "cuda"])
    assert cuda.exit_code == 2 and ("no CUDA GPU" in cuda.output or "cuda" in cuda.output)


@pytest.mark.bad_input
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(ws, tmp_path):
    from tiny import build_args

    with writer_lock(tmp_path / "o"):
        result = runner.invoke(app, build_args(ws, tmp_path / "o"))
        assert result.exit_code == 2 and "is being written by gradindex build (pid" in result.output
    # released (as the kernel releases it when a holder dies): the same command now builds
    assert runner.invoke(app, build_args(ws, tmp_path / "o")).exit_code == 0


@pytest.mark.bad_input
def test_merge_refuses_a_damaged_part(ws, tmp_path):
    from tiny import build_args

    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert runner.invoke(app, build_args(ws, part, "--shard", f"{i}/2")).exit_code == 0
    damaged = next((parts[1] / "shards").glob("*.codes.npy"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = runner.invoke(app, ["merge", *map(str, parts), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "damaged" in result.output and not (tmp_path / "m" / "manifest.json").exists()
