"""The command line end to end on a tiny saved model, and what bad input gets."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from gradindex import pipeline
from gradindex.factors import Factors
from gradindex.scores import ScoreResult
from tiny import random_texts, tiny_workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("cli"), random_texts(30), [{"prompt": "the king", "completion": " wrote a book"}])
    result = runner.invoke(app, ["fit", str(root / "model"), "--data", str(root / "train.jsonl"), "--out", str(root / "factors")])
    assert result.exit_code == 0, result.output
    return root


def test_fit_writes_factors_with_provenance(workspace):
    config = json.loads((workspace / "factors" / "factors.json").read_text())
    assert config["n_sequences"] == 30 and config["fisher"] == "true" and len(config["layers"]) == 4
    assert config["model"].endswith("model") and len(config["model_hash"]) == 32 and len(config["tokenizer_hash"]) == 32
    assert Factors.load(workspace / "factors").layers.keys() == {l["name"] for l in config["layers"]}


def test_fit_is_deterministic_given_the_seed(workspace, tmp_path):
    args = ["fit", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "again")]).exit_code == 0
    assert runner.invoke(app, args + ["--out", str(tmp_path / "seed1"), "--seed", "1"]).exit_code == 0
    a, b, c = (Factors.load(p) for p in (workspace / "factors", tmp_path / "again", tmp_path / "seed1"))
    for name in a.layers:
        assert torch.equal(a.layers[name].lam, b.layers[name].lam)
        assert not torch.equal(a.layers[name].lam, c.layers[name].lam)


def test_scores_cli_matches_python_and_writes_breakdowns(workspace, tmp_path):
    out = tmp_path / "s.npy"
    args = ["scores", str(workspace / "model"), "--factors", str(workspace / "factors"), "--data", str(workspace / "train.jsonl"),
            "--queries", str(workspace / "queries.jsonl"), "--out", str(out), "--per-layer", "--per-token"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = np.load(out)
    assert scores.shape == (1, 30) and scores.dtype == np.float32
    saved = ScoreResult.load(out)  # what the CLI wrote reads back whole, per-token rows in training order
    assert np.array_equal(saved.scores, scores) and len(saved.per_token) == 30
    np.testing.assert_allclose(sum(saved.per_layer.values()), scores, rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    np.testing.assert_allclose([t.sum() for t in saved.per_token], scores[0], rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    expected = pipeline.score(workspace / "model", workspace / "factors", workspace / "train.jsonl", workspace / "queries.jsonl", progress=False)
    np.testing.assert_allclose(scores, expected.scores, rtol=1e-5)
    layers = np.load(tmp_path / "s.per_layer.npz")
    np.testing.assert_allclose(sum(layers[k] for k in layers.files), scores, rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    tokens = np.load(tmp_path / "s.per_token.npz")
    np.testing.assert_allclose([tokens[str(i)].sum() for i in range(30)], scores[0], rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    # Damping can be changed at query time without refitting, and it changes the scores.
    damped = tmp_path / "d.npy"
    assert runner.invoke(app, args[:-2] + ["--out", str(damped), "--damping-scale", "10"]).exit_code == 0
    assert not np.allclose(np.load(damped), scores)
    # Query batching: a rank ≥ every layer's min(d_out, d_in) gives the exact scores back, rank 1 an approximation.
    for rank, exact in (("64", True), ("1", False)):
        low = tmp_path / f"r{rank}.npy"
        assert runner.invoke(app, args[:-2] + ["--out", str(low), "--query-rank", rank]).exit_code == 0
        assert np.allclose(np.load(low), scores, rtol=1e-4, atol=1e-5 * np.abs(scores).max()) == exact


BAD = {
    "missing model": (["fit", "{root}/nope", "--data", "{root}/train.jsonl", "--out", "{tmp}/f"], "model not found"),
    "no text field": (["fit", "{root}/model", "--data", "{root}/train.jsonl", "--text-field", "body", "--out", "{tmp}/f"], "no text field 'body'"),
    "unknown module regex": (["fit", "{root}/model", "--data", "{root}/train.jsonl", "--modules", "xyz", "--out", "{tmp}/f"], "matches no linear layer"),
    "longer than the model": (["fit", "{root}/model", "--data", "{root}/train.jsonl", "--max-length", "100000", "--out", "{tmp}/f"], "exceeds the model's context of 64"),
    "empty completion": (["scores", "{root}/model", "--factors", "{root}/factors", "--data", "{root}/train.jsonl", "--prompt", "the", "--completion", "", "--out", "{tmp}/s.npy"], "empty completion"),
    "query longer than the model": (["scores", "{root}/model", "--factors", "{root}/factors", "--data", "{root}/train.jsonl", "--prompt", "the " * 80, "--completion", " king", "--out", "{tmp}/s.npy"], "longer than the maximum length 64"),
    "factors from another model": (["scores", "{root}/other_model", "--factors", "{root}/factors", "--data", "{root}/train.jsonl", "--prompt", "the", "--completion", " king", "--out", "{tmp}/s.npy"], "factors were fitted on another model"),
    "bad query rank": (["scores", "{root}/model", "--factors", "{root}/factors", "--data", "{root}/train.jsonl", "--prompt", "the", "--completion", " king", "--query-rank", "0", "--out", "{tmp}/s.npy"], "query rank must be a positive integer"),
    "missing factors": (["scores", "{root}/model", "--factors", "{root}/none", "--data", "{root}/train.jsonl", "--prompt", "the", "--completion", " king", "--out", "{tmp}/s.npy"], "no factors in"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_one_line_and_nonzero_exit(workspace, tmp_path, case):
    args, message = BAD[case]
    result = runner.invoke(app, [a.format(root=workspace, tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "f").exists()


@pytest.mark.bad_input
def test_real_process_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cli.main", "fit", str(tmp_path / "missing"), "--data", "x.jsonl", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model not found: {tmp_path / 'missing'}"


def test_split_picks_the_split_of_a_saved_dataset_dict(workspace, tmp_path):
    import datasets

    texts = random_texts(12, seed=3)
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts[:5]})}).save_to_disk(str(tmp_path / "dd"))
    args = ["fit", str(workspace / "model"), "--data", str(tmp_path / "dd"), "--out", str(tmp_path / "f")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "no split 'train'; its splits are ['test', 'validation'] (use --split)" in refused.output
    assert not (tmp_path / "f").exists()
    done = runner.invoke(app, args + ["--split", "test"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "f" / "factors.json").read_text())["n_sequences"] == 5
    assert "tracked_fraction 0.667" in done.output
