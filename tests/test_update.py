"""An index grows and shrinks without a rebuild: rows added with its own factors, rows removed by
tombstones and then compacted away, each equal to a fresh build of the same rows; readers keep the
generation they opened."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from gradindex import pipeline
from gradindex.data import Query
from gradindex.search import GradIndex
from gradindex.update import DRIFT_REFIT
from tiny import build_args, random_texts

runner = CliRunner()
QUERIES = [Query("the king of the north", " wrote a book"), Query("music by", " the old composer"), Query("a red river", " of blue")]
BASE = 50


def write_jsonl(path, texts, source=None):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def texts_of(ws):
    return [json.loads(line)["text"] for line in (ws / "train.jsonl").read_text().splitlines()]


def built(ws, tmp_path, name, texts):
    data = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    args = build_args(ws, tmp_path / name)
    args[args.index("--data") + 1] = str(data)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / name


def answers(index, **options):
    """Every query's hits as (text, exact score, stage-2 score), both sides; exhaustive unless told."""
    options = {"k": 8, "k1": index.n, "k2": index.n, **options}
    out = []
    for opponents in (False, True):
        for r in index.query_many(QUERIES, opponents=opponents, **options):
            out.append([(index.reader.rows([h.row], ("text",))["text"][0], h.text, h.score, h.approx_score) for h in r.hits])
    return out


def assert_same(a, b):
    assert [[(t, u) for t, u, _, _ in q] for q in a] == [[(t, u) for t, u, _, _ in q] for q in b]
    np.testing.assert_allclose([s for q in a for _, _, s, _ in q], [s for q in b for _, _, s, _ in q], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([s for q in a for *_, s in q], [s for q in b for *_, s in q], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def grown(ws, tmp_path_factory):
    """An index of the first BASE texts with the rest added, and a fresh build of all of them."""
    tmp = tmp_path_factory.mktemp("grow")
    texts = texts_of(ws)
    root = built(ws, tmp, "grown", texts[:BASE])
    rest = write_jsonl(tmp / "rest.jsonl", texts[BASE:])
    result = runner.invoke(app, ["add", str(root), "--data", str(rest)])
    assert result.exit_code == 0, result.output
    return root, built(ws, tmp, "fresh", texts), result.output


def test_added_rows_answer_as_a_fresh_build_of_all_rows(grown):
    root, fresh, output = grown
    assert "factor drift" in output
    added, whole = GradIndex.open(root), GradIndex.open(fresh)
    assert added.n == whole.n and added.manifest.generation == 2 and added.manifest.additions[0].rows == (BASE, whole.n)
    assert_same(answers(added), answers(whole))
    assert_same(answers(added, candidates="tfidf", k2=5), answers(whole, candidates="tfidf", k2=5))  # TF-IDF refitted on every text
    meta = added.reader.rows(list(range(BASE - 1, BASE + 2)), ("offset", "source"))
    assert meta["offset"] == [BASE - 1, 0, 1] and meta["source"][1].endswith("rest.jsonl")  # an added row says where it came from
    assert pipeline.verify(root) == []


def test_adding_the_same_rows_again_changes_nothing(grown, tmp_path):
    root, _, _ = grown
    before = (root / "manifest.json").read_bytes()
    result = runner.invoke(app, ["add", str(root), "--data", str(root.parent / "rest.jsonl")])
    assert result.exit_code == 0 and "nothing to add" in result.output and (root / "manifest.json").read_bytes() == before


def test_drift_tells_same_data_from_other_data(ws, tmp_path):
    texts = texts_of(ws)
    root = built(ws, tmp_path, "base", texts[:BASE])
    same = pipeline.add(root, write_jsonl(tmp_path / "same.jsonl", texts[BASE:]), progress=False).additions[-1].drift
    longer = pipeline.add(root, write_jsonl(tmp_path / "longer.jsonl", random_texts(20, seed=9, lo=20, hi=40)), progress=False)
    # another distribution: two words alternating, a sequence the factors never saw the like of
    other = pipeline.add(root, write_jsonl(tmp_path / "other.jsonl", [" ".join(["king", "queen"] * 5) + f" {i}" for i in range(20)]),
                         progress=False)
    drifts = [same, longer.additions[-1].drift, other.additions[-1].drift]
    assert 0.7 < drifts[0] < DRIFT_REFIT and 0.7 < drifts[1] < DRIFT_REFIT <= drifts[2], drifts  # length alone does not count


@pytest.fixture(scope="module")
def shrunk(ws, tmp_path_factory):
    """An index of every text with rows removed by id and by source, and a fresh build of the rest."""
    tmp = tmp_path_factory.mktemp("shrink")
    texts = texts_of(ws)
    root = built(ws, tmp, "shrunk", texts[:BASE])
    pipeline.add(root, write_jsonl(tmp / "extra.jsonl", texts[BASE:]), progress=False)
    result = runner.invoke(app, ["remove", str(root), "--rows", "3,17,40"])
    assert result.exit_code == 0 and "removed 3 rows" in result.output, result.output
    result = runner.invoke(app, ["remove", str(root), "--where", "source contains 'extra'"])
    assert result.exit_code == 0 and f"removed {len(texts) - BASE} rows" in result.output, result.output
    kept = [t for i, t in enumerate(texts[:BASE]) if i not in (3, 17, 40)]
    return root, built(ws, tmp, "rest", kept), kept


def test_removed_rows_never_answer_and_the_rest_answer_as_a_fresh_build(shrunk):
    root, fresh, kept = shrunk
    index, whole = GradIndex.open(root), GradIndex.open(fresh)
    removed = {3, 17, 40, *range(BASE, index.reader.n_rows)}
    assert index.n == len(kept) == whole.n
    for options in ({}, {"candidates": "tfidf", "k2": 5}, {"candidates": "hybrid", "k2": 6}, {"k1": 10, "k2": 4}, {"distinct": True}):
        results = index.query_many(QUERIES, **{"k": 8, "k1": index.n, "k2": index.n, **options}, trace=True)
        assert not removed & {int(r) for q in results for r in [*q.trace.stage1_rows, *q.trace.shortlist_rows, *[h.row for h in q.hits]]}
    assert_same(answers(index), answers(whole))
    assert_same(answers(index, candidates="tfidf", k2=5), answers(whole, candidates="tfidf", k2=5))
    assert not removed & {row for row, _, _ in pipeline.outliers(index, n=len(kept))}
    scores = index.all_scores(QUERIES[:1])[0]
    assert np.isnan(scores[sorted(removed)]).all() and np.isfinite(np.delete(scores, sorted(removed))).all()


def test_compact_equals_a_fresh_build_of_the_remaining_rows(shrunk, tmp_path):
    root, fresh, kept = shrunk
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = GradIndex.open(copy)
    expected = answers(before)
    result = runner.invoke(app, ["compact", str(copy)])
    assert result.exit_code == 0, result.output
    after, whole = GradIndex.open(copy), GradIndex.open(fresh)
    assert after.reader.n_rows == len(kept) and after.manifest.n_removed == 0 and after.reader.rows(list(range(len(kept))))["text"] == kept
    for options in ({}, {"k1": 10, "k2": 4}, {"candidates": "tfidf", "k2": 5}):
        a, b = after.query_many(QUERIES, **options), whole.query_many(QUERIES, **options)
        assert [[h.row for h in r.hits] for r in a] == [[h.row for h in r.hits] for r in b]
        np.testing.assert_allclose([h.score for r in a for h in r.hits], [h.score for r in b for h in r.hits], rtol=1e-5)
    assert_same(answers(after), expected)
    assert answers(before) == expected  # the reader of the previous generation still answers from its own files
    assert pipeline.verify(copy) == []
    assert (copy / "shards").is_dir()  # the previous generation's shards stay for its readers until the next update
    again = runner.invoke(app, ["compact", str(copy)])
    assert again.exit_code == 0 and GradIndex.open(copy).manifest.generation == after.manifest.generation  # nothing to do


def test_a_reader_keeps_the_generation_it_opened(ws, tmp_path):
    texts = texts_of(ws)
    root = built(ws, tmp_path, "live", texts[:BASE])
    reader = GradIndex.open(root)
    expected = answers(reader)
    pipeline.add(root, write_jsonl(tmp_path / "more.jsonl", texts[BASE:]), progress=False)
    pipeline.remove(root, rows=[0, 1])
    assert answers(reader) == expected and reader.n == BASE
    assert GradIndex.open(root).n == len(texts) - 2


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--rows", "3,x"], "--rows takes row ids"),
    (["--rows", "999"], "rows must be whole numbers from 0"),
    ([], "say which rows to remove"),
    (["--rows", "1", "--where", "offset < 3"], "say which rows to remove"),
    (["--where", "colour = 'red'"], "cannot read --where"),
    (["--where", "offset ~ 3"], "cannot read --where"),
    (["--where", "offset < 'a'"], "offset compares with a number"),
    (["--where", "source = abc"], "source compares with a quoted string"),
    (["--where", "offset >= 0"], "would remove all"),
])
def test_bad_removals_are_one_line_and_change_nothing(ws, tmp_path, args, message):
    root = tmp_path / "idx"
    shutil.copytree(ws / "idx", root)
    before = (root / "manifest.json").read_bytes()
    result = runner.invoke(app, ["remove", str(root), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert (root / "manifest.json").read_bytes() == before


@pytest.mark.bad_input
def test_removing_needs_an_index_and_adding_needs_rows(ws, tmp_path):
    assert "no index at" in runner.invoke(app, ["remove", str(tmp_path / "none"), "--rows", "1"]).output
    root = tmp_path / "idx"
    shutil.copytree(ws / "idx", root)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    result = runner.invoke(app, ["add", str(root), "--data", str(empty)])
    assert result.exit_code == 2, result.output
    assert pipeline.add(root, ws / "train.jsonl", progress=False).generation == 1  # the build's own rows: nothing to add


READER = """
import json, sys, time
from pathlib import Path
from gradindex.search import GradIndex
root, stop = Path(sys.argv[1]), Path(sys.argv[2])
while True:
    done = stop.exists()
    index = GradIndex.open(root)  # whatever manifest is complete at this instant
    hits = [[(h.row, round(h.score, 5)) for h in index.query(p, c, k=5, candidates="hybrid").hits] for p, c in json.loads(sys.argv[3])]
    print(json.dumps({"generation": index.manifest.generation, "hits": hits}), flush=True)
    if done:
        break
"""


def test_reader_processes_during_an_add_answer_from_a_complete_generation(ws, tmp_path):
    import subprocess
    import sys
    import time

    texts = texts_of(ws)
    root = built(ws, tmp_path, "shared", texts[:BASE])
    queries = [(q.prompt, q.completion) for q in QUERIES]

    def expected():
        index = GradIndex.open(root)
        return [[(h.row, round(h.score, 5)) for h in index.query(p, c, k=5, candidates="hybrid").hits] for p, c in queries]

    answers_at = {1: expected()}
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(root), str(stop), json.dumps(queries)], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).parent.parent) for _ in range(3)]
    first = [json.loads(r.stdout.readline()) for r in readers]  # every reader has answered once before the add starts
    pipeline.add(root, write_jsonl(tmp_path / "more.jsonl", texts[BASE:]), progress=False)
    answers_at[2] = expected()
    time.sleep(1.0)
    stop.write_text("")
    lines = first + [json.loads(line) for r in readers for line in r.communicate(timeout=120)[0].splitlines()]
    assert all(r.returncode == 0 for r in readers)
    assert all(line["hits"] == [[list(h) for h in q] for q in answers_at[line["generation"]]] for line in lines)
    assert {line["generation"] for line in lines} == {1, 2}
