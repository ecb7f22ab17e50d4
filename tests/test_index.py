"""The index end to end on a tiny saved model: build, resume, shard and merge, query, eval, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from gradindex import builder as build_module
from gradindex.analysis import outliers
from gradindex.manifest import SCHEMA_VERSION
from gradindex import pipeline
from gradindex.data import Query, load_queries, tokenize_queries
from gradindex.pipeline import build, merge
from gradindex.codeplan import CompressionConfig
from gradindex.errors import GradIndexError
from gradindex.search import GradIndex
from gradindex.store import shard_path
from tiny import N, SHARD, build_args, random_texts

runner = CliRunner()
COMPRESSION = CompressionConfig(budget=8192, stage1_dim=64)
EVERY_ENTRY = CompressionConfig(budget=65536, stage1_dim=64, block_cost=1e3, dtype="float32")  # stage 2 = exact influence
ROOT = Path(__file__).resolve().parent.parent
def shard_bytes(root):
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.npy"))}


def test_manifest_describes_the_build(ws):
    m = json.loads((ws / "idx" / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["n_rows"] == N and m["index"]["ntotal"] == N
    assert len(m["shards"]) == -(-N // SHARD) and [s["rows"] for s in m["shards"]][-1] == [64, 70]
    assert {"gradindex", "torch", "faiss", "transformers"} <= m["versions"].keys()
    assert len(m["model_hash"]) == 32 and len(m["factors_hash"]) == 64 and m["data_rows"] == N
    assert m["compression"]["stage1_dim"] == 64 and m["compression"]["budget"] == 8192 and m["index"]["key"] == "HR,RaBitQ"
    assert all(len(f["sha256"]) == 64 for s in m["shards"] for f in s["files"].values())
    meta = pq.read_table(ws / "idx" / "shards" / "00001.meta.parquet")
    assert meta.column("row_id").to_pylist() == list(range(16, 32))
    texts = [json.loads(line)["text"] for line in (ws / "train.jsonl").read_text().splitlines()]
    assert meta.column("text").to_pylist() == texts[16:32]
    assert runner.invoke(app, ["verify", str(ws / "idx")]).exit_code == 0
    info = runner.invoke(app, ["info", str(ws / "idx")])
    assert info.exit_code == 0 and "70 sequences" in info.output


def test_exhaustive_cascade_returns_the_exact_top_k_with_the_exact_scores(index, exact, ws):
    queries = [json.loads(line) for line in (ws / "queries.jsonl").read_text().splitlines()]
    for q, row in zip(queries, exact):
        for opponents, order in ((False, np.argsort(-row)), (True, np.argsort(row))):
            result = index.query(q["prompt"], q["completion"], k=5, k1=N, k2=N, opponents=opponents)
            assert [h.row for h in result.hits] == order[:5].tolist()
            np.testing.assert_allclose([h.score for h in result.hits], row[order[:5]], rtol=1e-5)


def test_an_index_with_factors_answers_exactly_and_its_stage_2_is_the_compressors(ws, exact, tmp_path):
    """Built with --factor-share from the CLI: the exhaustive cascade returns the exact top k, stage 2's scores are
    the compressor's factor scores of the stored codes, and the info line says so."""
    out = tmp_path / "factored"
    assert runner.invoke(app, build_args(ws, out, "--factor-share", "0.5", "--factor-block", "4")).exit_code == 0
    index = GradIndex.open(out)
    assert index.manifest.compression.factor_share == 0.5 and index.compressor.factored
    assert index.manifest.vector_dim == index.manifest.compression.stage1_dim  # stage 1: the entries, not the factors
    queries = [json.loads(line) for line in (ws / "queries.jsonl").read_text().splitlines()]
    for q, row in zip(queries, exact):
        result = index.query_many([Query(q["prompt"], q["completion"])], k=5, k1=N, k2=N, trace=True)[0]
        assert [h.row for h in result.hits] == np.argsort(-row)[:5].tolist()
        np.testing.assert_allclose([h.score for h in result.hits], row[np.argsort(-row)[:5]], rtol=1e-5)
        embedding = index.compressor.embed(index.lm.model, tokenize_queries(index.lm.tokenizer, [Query(q["prompt"], q["completion"])], 64))
        stage2 = index.compressor.scores(index.reader.codes(result.trace.stage1_rows), embedding)[0]
        np.testing.assert_allclose(result.trace.stage2_scores, stage2, rtol=1e-4, atol=1e-6 * np.abs(stage2).max())
    assert "low-rank factors" in runner.invoke(app, ["info", str(out)]).output


def test_default_cascade_scores_are_exact_and_breakdowns_add_up(index, exact, ws):
    result = index.query("the king of the north", " wrote a book", k=4, k1=30, k2=10, per_token=True)
    assert len(result.hits) == 4 and result.seconds["total"] > 0
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    for h in result.hits:
        assert h.score == pytest.approx(float(exact[0, h.row]), rel=1e-5)
        assert sum(h.per_layer.values()) == pytest.approx(h.score, rel=1e-4)
        assert sum(h.token_scores) == pytest.approx(h.score, rel=1e-3, abs=1e-6)
        assert len(h.tokens) == len(h.token_scores)
        assert h.text == json.loads((ws / "train.jsonl").read_text().splitlines()[h.row])["text"]


def test_all_scores_exact_is_brute_force_and_stage1_is_the_faiss_inner_product(index, exact, ws):
    queries = load_queries(ws / "queries.jsonl")
    np.testing.assert_allclose(index.all_scores(queries), exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    stage1 = index.all_scores(queries, exact=False)
    # Independent: the stored codes' stage-1 prefixes against the query's, by hand.
    prefix = np.concatenate([np.load(p).astype(np.float32) for p in sorted((ws / "idx" / "shards").glob("*.codes.npy"))])[:, : index.manifest.vector_dim]
    embedded = index.compressor.embed(index.lm.model, tokenize_queries(index.lm.tokenizer, queries, 64))
    np.testing.assert_allclose(stage1, embedded.codes[:, : prefix.shape[1]] @ prefix.T, rtol=1e-4, atol=1e-4 * np.abs(stage1).max())
    # FAISS's 1-bit RaBitQ scores estimate those inner products: the same order, roughly.
    result = index.query(queries[0].prompt, queries[0].completion, k=3, k1=N, k2=N, trace=True)
    from scipy.stats import spearmanr

    assert spearmanr(stage1[0, result.trace.stage1_rows], result.trace.stage1_scores).statistic > 0.8


def test_cosine_scores_are_normalised(index):
    result = index.query("the king of the north", " wrote a book", k=3, k1=N, k2=N, cosine=True)
    assert all(-1.0 - 1e-3 <= h.score <= 1.0 + 1e-3 for h in result.hits)


def test_eval_reports_perfect_recall_when_stages_are_exhaustive(ws):
    result = runner.invoke(app, ["eval", str(ws / "idx"), "--queries", str(ws / "queries.jsonl"), "-k", "5", "--k1", str(N), "--k2", str(N), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for side in ("proponents", "opponents"):
        assert report[side]["recall_at_k"] == 1.0 and report[side]["stage1_recall"] == 1.0
        assert report[side]["exact_max_rel_diff"] < 1e-4
        assert report[side]["missed_outside_stage1"] == 0.0 and report[side]["expected_outside_stage1"] == 0.0
        worst, mean = report[side]["stage2_worst_at_depth"], report[side]["stage2_recall_at_depth"]
        assert worst.keys() == mean.keys() == {"10", "20", "50"} and all(worst[d] <= mean[d] for d in worst)
    assert report["latency_p50"] > 0 and report["brute_force_seconds"] > 0


def test_eval_compares_stage_1_misses_with_their_prediction(ws):
    result = runner.invoke(app, ["eval", str(ws / "idx"), "--queries", str(ws / "queries.jsonl"), "-k", "5", "--k1", "8", "--k2", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for side in ("proponents", "opponents"):
        measured = report[side]
        assert measured["missed_outside_stage1"] == pytest.approx((1 - measured["stage1_recall"]) * 5)
        assert measured["missed_outside_stage1"] > 0 and measured["expected_outside_stage1"] > 0  # stage 1's 8 of 70 miss, and it says so


def test_query_cli_json_and_text(ws):
    args = ["query", str(ws / "idx"), "--prompt", "music by", "--completion", " the old composer", "-k", "3"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["hits"]) == 3 and {"row", "score", "approx_score", "text", "per_layer"} <= payload["hits"][0].keys()
    text = runner.invoke(app, args + ["--opponents"])
    assert text.exit_code == 0 and "opponents" in text.output
    batch = runner.invoke(app, ["query", str(ws / "idx"), "--queries", str(ws / "queries.jsonl"), "-k", "2", "--json"])
    assert batch.exit_code == 0 and len(batch.stdout.strip().splitlines()) == 2


def test_killed_build_resumes_to_the_same_rows(ws, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = build_module._build_shard
    calls = []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_build_shard", dies_on_third)
    result = runner.invoke(app, build_args(ws, out))
    assert result.exit_code == 130 and not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["00000.json", "00001.json"]
    opened = runner.invoke(app, ["query", str(out), "--prompt", "music by", "--completion", " the old composer"])
    assert opened.exit_code == 2 and "incomplete (2 of 5 shards built" in opened.output
    monkeypatch.setattr(build_module, "_build_shard", real)
    calls.clear()
    assert runner.invoke(app, build_args(ws, out)).exit_code == 0
    assert shard_bytes(out) == shard_bytes(ws / "idx")
    assert json.loads((out / "manifest.json").read_text())["n_rows"] == N


def test_parts_merge_into_the_same_index(ws, tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        result = runner.invoke(app, build_args(ws, part, "--shard", f"{i}/2"))
        assert result.exit_code == 0, result.output
        assert not (part / "manifest.json").exists()
    missing = runner.invoke(app, ["merge", str(parts[0]), "--out", str(tmp_path / "half")])
    assert missing.exit_code == 2 and "not built yet" in missing.output
    result = runner.invoke(app, ["merge", *map(str, parts), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "merged") == shard_bytes(ws / "idx")
    merged = GradIndex.open(tmp_path / "merged").query("music by", " the old composer", k=3, k1=N, k2=N)
    full = GradIndex.open(ws / "idx").query("music by", " the old composer", k=3, k1=N, k2=N)
    assert [h.row for h in merged.hits] == [h.row for h in full.hits]


def test_torchrun_ranks_build_the_same_index(ws, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.main", *build_args(ws, out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    # One thread per rank here vs the test process's threads: float16 values may differ by one unit in the last place.
    for j in range(-(-N // SHARD)):
        a, b = (np.load(shard_path(root, j, "codes")).astype(np.float32) for root in (out, ws / "idx"))
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())
        assert pq.read_table(shard_path(out, j, "meta")).drop(["self_influence"]).equals(
            pq.read_table(shard_path(ws / "idx", j, "meta")).drop(["self_influence"]))
    assert json.loads((out / "manifest.json").read_text())["n_rows"] == N


def test_torchrun_ranks_fit_the_factors_one_process_fits(ws, tmp_path):
    """Each rank passes over its share of the batches; covariances, token counts and Λ are summed across ranks."""
    from gradindex.factors import Factors

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.main", "fit",
           str(ws / "model"), "--data", str(ws / "train.jsonl"), "--out", str(tmp_path / "f2"), "--token-budget", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    single = pipeline.fit(str(ws / "model"), str(ws / "train.jsonl"), out=tmp_path / "f1", token_budget=64, progress=False)
    split = Factors.load(tmp_path / "f2")
    assert single.config.n_tokens == split.config.n_tokens and set(single.layers) == set(split.layers)
    for name, f in single.layers.items():
        g = split.layers[name]
        for field in ("a_eigvals", "s_eigvals", "lam"):  # eigenvectors may flip sign; what they span and weigh is compared
            np.testing.assert_allclose(getattr(g, field), getattr(f, field), rtol=1e-6, atol=1e-6 * getattr(f, field).abs().max())
        for q, vals in (("q_a", "a_eigvals"), ("q_s", "s_eigvals")):
            rebuilt = [getattr(x, q) @ torch.diag(getattr(x, vals).to(getattr(x, q).dtype)) @ getattr(x, q).T for x in (f, g)]
            np.testing.assert_allclose(rebuilt[1], rebuilt[0], atol=1e-6 * rebuilt[0].abs().max())


def test_index_types_are_chosen_by_memory_and_overridable(ws, tmp_path):
    from gradindex.ann import choose_key

    assert choose_key(1000, 512, 4 * 2**30) == "HR,RaBitQ" == choose_key(10**7, 2048, 4 * 2**30)  # 264 bytes per row
    assert choose_key(10**8, 2048, 4 * 2**30).startswith("HR,IVF")
    result = runner.invoke(app, build_args(ws, tmp_path / "ivf", "--index-key", "IVF2,Flat"))
    assert result.exit_code == 0, result.output
    hits = GradIndex.open(tmp_path / "ivf").query("music by", " the old composer", k=3, k1=N, k2=N, nprobe=2).hits
    full = GradIndex.open(ws / "idx").query("music by", " the old composer", k=3, k1=N, k2=N).hits
    assert [h.row for h in hits] == [h.row for h in full]
    bad = runner.invoke(app, build_args(ws, tmp_path / "bad", "--index-key", "NoSuchIndex"))
    assert bad.exit_code == 2 and "faiss cannot make index" in bad.output


@pytest.mark.bad_input
@pytest.mark.parametrize("option", [["-k", "0"], ["-k", "-1"], ["-k", "71"], ["--k1", "0"], ["--k2", "-3"]])
def test_bad_k_or_rank_is_refused(ws, option):
    result = runner.invoke(app, ["query", str(ws / "idx"), "--prompt", "music by", "--completion", " the", *option])
    assert result.exit_code == 2 and option[0].strip("-") in result.output and "Traceback" not in result.output


@pytest.mark.bad_input
@pytest.mark.parametrize("prompt,completion,message", [("", " the", "empty prompt"), ("music", "  ", "empty completion")])
def test_empty_query_parts_are_refused(ws, prompt, completion, message):
    result = runner.invoke(app, ["query", str(ws / "idx"), "--prompt", prompt, "--completion", completion])
    assert result.exit_code == 2 and message in result.output


def test_missing_half_written_newer_and_corrupt_indexes_are_refused(ws, tmp_path):
    import shutil

    def query(path):
        return runner.invoke(app, ["query", str(path), "--prompt", "music by", "--completion", " the"])

    assert "no index at" in query(tmp_path / "nowhere").output
    copy = tmp_path / "copy"
    shutil.copytree(ws / "idx", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    newer = query(copy)
    assert newer.exit_code == 2 and "schema version 99" in newer.output
    (copy / "manifest.json").write_text(json.dumps(manifest))
    path = shard_path(copy, 2, "codes")
    path.write_bytes(path.read_bytes()[:-10])
    truncated = query(copy)
    assert truncated.exit_code == 2 and "truncated or corrupt" in truncated.output
    data = bytearray((ws / "idx" / path.relative_to(copy)).read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    verify = runner.invoke(app, ["verify", str(copy)])
    assert verify.exit_code == 1 and "00002.codes.npy: sha256 differs" in verify.output
    (copy / "manifest.json").unlink()
    assert "no manifest.json" in query(copy).output or "no index" in query(copy).output


@pytest.mark.bad_input
def test_mismatched_model_is_refused(ws):
    result = runner.invoke(app, ["query", str(ws / "idx"), "--model", str(ws / "other_model"), "--prompt", "music by", "--completion", " the"])
    assert result.exit_code == 2 and "another model" in result.output


@pytest.mark.bad_input
def test_bad_build_input_loses_nothing(ws, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    args = build_args(ws, tmp_path / "x")
    args[args.index("--data") + 1] = str(bad)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not valid UTF-8" in result.output
    before = shard_bytes(ws / "idx")
    other = runner.invoke(app, build_args(ws, ws / "idx")[:-2] + ["--shard-size", "8"])
    assert other.exit_code == 2 and "different shard_size" in other.output
    assert shard_bytes(ws / "idx") == before and (ws / "idx" / "manifest.json").exists()
    bad_shard = runner.invoke(app, build_args(ws, tmp_path / "y", "--shard", "3/2"))
    assert bad_shard.exit_code == 2 and "shard" in bad_shard.output


def test_python_build_fits_factors_when_none_are_given(ws, tmp_path, monkeypatch):
    from gradindex import model as model_module

    hashed = []
    real = model_module.model_fingerprint
    monkeypatch.setattr(model_module, "model_fingerprint", lambda m: hashed.append(1) or real(m))
    lm = model_module.load_model(str(ws / "model"))
    out = build(lm, str(ws / "train.jsonl"), tmp_path / "fitted", compression=COMPRESSION, shard_size=32, token_budget=256, progress=False)
    GradIndex.open(out, model=lm)
    assert len(hashed) == 1  # fitting, building and opening share one hash of the weights
    assert (out / "factors" / "factors.safetensors").exists() and (out / "manifest.json").exists()
    fitted = json.loads((out / "factors" / "factors.json").read_text())
    assert fitted["data"] == str(ws / "train.jsonl") and fitted["token_budget"] == 256 and fitted["modules"] == "mlp"
    with pytest.raises(GradIndexError, match="nothing to merge"):
        merge([], tmp_path / "none")


@pytest.mark.bad_input
def test_other_factors_are_refused_before_the_index_loses_its_own(ws, tmp_path):
    other = tmp_path / "other_factors"
    pipeline.fit(str(ws / "model"), str(ws / "train.jsonl"), out=other, seed=1, progress=False)
    factors = {p.name: p.read_bytes() for p in (ws / "idx" / "factors").iterdir()}
    args = build_args(ws, ws / "idx")
    args[args.index("--factors") + 1] = str(other)
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "different factors_hash" in refused.output
    assert {p.name: p.read_bytes() for p in (ws / "idx" / "factors").iterdir()} == factors
    assert runner.invoke(app, ["verify", str(ws / "idx")]).exit_code == 0


def test_copies_of_a_text_share_one_exact_rescore_and_count_once_in_k2(ws, tmp_path):
    texts = random_texts(30, seed=9)
    texts += [texts[0]] * 6 + [texts[1]] * 4  # 7 and 5 copies
    data = tmp_path / "dup.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    out = build(str(ws / "model"), str(data), tmp_path / "dup", factors=ws / "factors", compression=EVERY_ENTRY, progress=False)
    exact = pipeline.score(ws / "model", ws / "factors", data, [Query(texts[0], " the")], progress=False).scores[0]
    result = GradIndex.open(out).query_many([Query(texts[0], " the")], k=12, k1=len(texts), k2=12, trace=True)[0]
    kept = [texts[r] for r in result.trace.shortlist_rows]
    assert len(set(kept)) == 12  # twelve distinct texts survive stage 2 …
    for text in set(kept):  # … each with every one of its copies
        assert kept.count(text) == texts.count(text)
    hits = result.hits
    assert len(hits) == 12 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    np.testing.assert_allclose([h.score for h in hits], exact[[h.row for h in hits]], rtol=1e-5)
    from gradindex.evaluation import true_top

    assert {h.row for h in hits} <= true_top(exact, 12)  # copies tie: any of them is a true member
    # distinct=True: twelve different texts, each with its copies listed, in order of score.
    opened = GradIndex.open(out)
    distinct = opened.query(texts[0], " the", k=12, k1=len(texts), k2=len(texts), distinct=True).hits
    assert len({texts[h.row] for h in distinct}) == 12 and [h.score for h in distinct] == sorted((h.score for h in distinct), reverse=True)
    for h in distinct:
        assert sorted([h.row, *h.copies]) == [i for i, t in enumerate(texts) if t == texts[h.row]]
    by_text = {}
    for row, score in enumerate(exact):
        by_text.setdefault(texts[row], score)
    assert [texts[h.row] for h in distinct] == sorted(by_text, key=lambda t: -by_text[t])[:12]


def test_outliers_list_the_highest_self_influence_stored_and_exact(ws, index):
    from gradindex.scores import sequence_gradients

    # Independent: I(z, z) = Σ_layers |G̃_z / sqrt(Λ + λ)|² with G̃ = Q_Sᵀ G_z Q_A, λ = 0.1 · mean Λ.
    data = index.training_set(range(N))
    grads = sequence_gradients(index.lm.model, index.factors.specs, data)
    truth = sum(
        (index.factors.rotate(name, g).double().square() / (index.factors.layers[name].lam.double() + index.factors.damping(name))).sum((1, 2))
        for name, g in grads.items()
    ).numpy()
    order = np.argsort(-truth)
    stored = outliers(index, 5)
    exact = outliers(index, 5, exact=True)
    assert [r for r, _, _ in exact] == order[:5].tolist()
    np.testing.assert_allclose([v for _, v, _ in exact], truth[order[:5]], rtol=1e-4)
    # Stored: the code's squared norm, the part of I(z, z) on the entries the code keeps, so never above it.
    assert all(v <= truth[r] * (1 + 1e-3) and v > 0.2 * truth[r] for r, v, _ in stored)
    assert [v for _, v, _ in stored] == sorted((v for _, v, _ in stored), reverse=True)
    texts = [json.loads(line)["text"] for line in (ws / "train.jsonl").read_text().splitlines()]
    assert all(t == texts[r] for r, _, t in stored)
    heavier = outliers(index, 5, exact=True, damping_scale=10.0)
    assert all(h < e for (_, h, _), (_, e, _) in zip(sorted(heavier), sorted(exact)))
    result = runner.invoke(app, ["outliers", str(ws / "idx"), "-n", "3", "--json"])
    assert result.exit_code == 0 and [json.loads(x)["row"] for x in result.stdout.strip().splitlines()] == [r for r, _, _ in stored[:3]]
    bad = runner.invoke(app, ["outliers", str(ws / "idx"), "-n", "0"])
    assert bad.exit_code == 2 and "n must be between" in bad.output


@pytest.mark.bad_input
def test_an_index_of_an_older_schema_is_refused_with_a_request_to_rebuild(ws, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(ws / "idx", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    result = runner.invoke(app, ["query", str(copy), "--prompt", "music by", "--completion", " the"])
    assert result.exit_code == 2 and "schema version 2" in result.output and "rebuild the index" in result.output


def test_expected_missed_counts_unrescored_candidates_likely_to_beat_the_cut():
    from gradindex.candidates import expected_missed

    rng = np.random.default_rng(0)
    exact = rng.standard_normal(1000) * 10
    estimate = 0.5 * exact + rng.standard_normal(1000)  # a code keeps half of every score, plus noise
    rows = np.arange(1000)
    for sign in (1.0, -1.0):
        order = np.argsort(-sign * estimate)
        top = order[:100]  # rescored: stage 2's best 100 …
        sure, _ = expected_missed(rows, estimate, top, estimate[top], exact[top], 10, sign)
        assert sure < 0.05  # … hold every true top-10 with room to spare, and the estimate says so
        few = order[5:100]  # … now stage 2's five best are left unrescored: most of them belong in the top 10
        missing = len(set(np.argsort(-sign * exact)[:10]) - set(few.tolist()))
        predicted, _ = expected_missed(rows, estimate, few, estimate[few], exact[few], 10, sign)
        assert missing >= 3 and abs(predicted - missing) <= 1.5
    assert expected_missed(rows, estimate, rows, estimate, exact, 10, 1.0) == (0.0, 0.0)  # all rescored: nothing missed


def test_expected_missed_estimates_what_stage_1_never_returned_from_a_random_sample():
    from gradindex.candidates import expected_missed

    rng = np.random.default_rng(1)
    exact = rng.standard_normal(20_000) * 10
    estimate = 0.5 * exact + rng.standard_normal(20_000)
    returned = rng.choice(20_000, 1_000, replace=False)  # a stage 1 that found nothing in particular
    rest = np.setdiff1d(np.arange(20_000), returned)
    truth = set(np.argsort(-exact)[:10].tolist())
    top = returned[np.argsort(-estimate[returned])[:100]]
    alone, none_outside = expected_missed(returned, estimate[returned], top, estimate[top], exact[top], 10, 1.0)
    assert alone < 0.5 and none_outside == 0.0  # without the sample the cascade looks sure of itself
    probe = rng.choice(rest, 1024, replace=False)
    total, outside = expected_missed(returned, estimate[returned], top, estimate[top], exact[top], 10, 1.0,
                                     estimate[probe], len(rest) / len(probe))
    assert len(truth - set(returned.tolist())) >= 9 and total >= 5 and outside > 0.9 * total  # it was missing them
    good = np.argsort(-estimate)[:1_000]  # a stage 1 that returned the best rows: the sample sees little beyond them
    top = good[:100]
    rest = np.setdiff1d(np.arange(20_000), good)
    probe = rng.choice(rest, 1024, replace=False)
    total, outside = expected_missed(good, estimate[good], top, estimate[top], exact[top], 10, 1.0, estimate[probe], len(rest) / len(probe))
    assert total < 0.5 and outside < 0.1


def test_a_query_whose_stage_1_missed_rows_says_so_and_names_k1(index, exact, ws):
    query = json.loads((ws / "queries.jsonl").read_text().splitlines()[0])
    whole = index.query(query["prompt"], query["completion"], k=5, k1=N, k2=N)
    assert whole.expected_missed == 0.0 and whole.missed_outside_stage1 == 0.0  # every row rescored: nothing can be missing
    short = index.query(query["prompt"], query["completion"], k=5, k1=8, k2=8, trace=True)
    truly_missed = len(set(np.argsort(-exact[0])[:5].tolist()) - set(short.trace.stage1_rows.tolist()))
    assert truly_missed >= 1 and short.expected_missed >= 0.5 and short.missed_outside_stage1 > short.expected_missed / 2
    assert short.uncertain and "--k1" in short.note
