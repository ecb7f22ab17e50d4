"""Validation by retraining: the LDS on a datamodel with a known answer, bit-reproducible training, the cache of
retrained runs, every preconditioner against explicit per-example gradients in float64, and the CLI verb."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.feature_extraction.text import TfidfVectorizer
from typer.testing import CliRunner

from cli.main import app
from gradindex.data import Query, tokenize_queries, tokenize_texts
from gradindex.errors import GradIndexError
from gradindex.fitting import fit_factors
from gradindex.layers import select_layers
from gradindex.lexical import _PARAMS
from gradindex.preconditioners import ADAM_EPS, training_scores
from gradindex.scores import compute_scores
from gradindex.training import TrainRecipe, log_probs, train
from gradindex.validation import Retrainer, ValidationConfig, lds, lds_interval, subset_rows
from tiny import autograd_gradients, random_texts, tiny_model, word_tokenizer

RECIPE = TrainRecipe(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, weight_decay=0.01, seed=5)


def test_lds_is_one_for_an_exact_linear_datamodel_and_tracks_its_noise():
    """When the measured output is exactly Σ_{i∈S} w_i, the weights score LDS 1, their negation −1, noise ~0."""
    rng = np.random.default_rng(0)
    n, q, config = 200, 6, ValidationConfig(subsets=40)
    w = rng.standard_normal((q, n))
    subsets = subset_rows(n, config)
    assert all(len(s) == n // 2 and len(np.unique(s)) == n // 2 for s in subsets)
    masks = np.zeros((len(subsets), n))
    for m, rows in enumerate(subsets):
        masks[m, rows] = 1
    measured = 3.0 + masks @ w.T  # (M, Q)
    np.testing.assert_allclose(lds(w, subsets, measured), 1.0)
    np.testing.assert_allclose(lds(-w, subsets, measured), -1.0)
    assert abs(np.mean(lds(rng.standard_normal((q, n)), subsets, measured))) < 0.2
    noisy = lds(w + rng.standard_normal((q, n)), subsets, measured)  # half the signal's variance is noise
    assert 0.4 < noisy.mean() < 0.9
    lo, hi = lds_interval(w + rng.standard_normal((q, n)), subsets, measured, np.arange(q), draws=200, seed=0)
    assert lo < noisy.mean() < hi and hi - lo < 0.5
    guess = w[0] + rng.standard_normal(n)  # our Spearman is scipy's
    assert lds(guess[None], subsets, measured[:, :1])[0] == pytest.approx(spearmanr(masks @ guess, measured[:, 0]).statistic)


def _data(tokenizer, n=12, seed=1):
    return tokenize_texts(tokenizer, random_texts(n, seed=seed), max_length=24)


def test_training_is_bit_reproducible_given_the_seed(tokenizer):
    data = _data(tokenizer)
    runs = []
    for seed in (5, 5, 6):
        model = tiny_model("gpt2", width=16, seed=0)  # with dropout (0.1), which must draw the same masks
        assert model.config.resid_pdrop > 0
        torch.manual_seed(seed * 100)  # whatever the caller's generator holds
        losses, optimizer = train(model, data, TrainRecipe(**{**RECIPE.__dict__, "seed": seed}), progress=False)
        assert len(losses) == RECIPE.steps and optimizer.state  # step-based: exactly the recipe's steps
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # another seed draws other batches


def test_a_recipe_round_trips_and_bad_ones_are_one_line_errors(tmp_path):
    assert TrainRecipe.load(RECIPE.save(tmp_path)) == RECIPE
    (tmp_path / "bad.json").write_text(json.dumps({"steps": 3, "batch_size": 2, "lr": 1e-3, "epochs": 2}))
    with pytest.raises(GradIndexError, match="unknown recipe fields.*epochs"):
        TrainRecipe.load(tmp_path / "bad.json")
    with pytest.raises(GradIndexError, match="steps must be a positive integer"):
        TrainRecipe(steps=0, batch_size=2, lr=1e-3)
    with pytest.raises(GradIndexError, match="cannot read the training recipe"):
        TrainRecipe.load(tmp_path / "missing.json")


def test_retrainer_trains_each_set_of_rows_once_and_resumes_from_its_cache(tokenizer, tmp_path):
    data = _data(tokenizer)
    queries = tokenize_queries(tokenizer, [Query("the king", " wrote a book"), Query("music by", " the composer")], 24)
    rows = np.array([0, 2, 3, 5, 7, 8, 9, 11])

    def retrainer(q=queries):
        return Retrainer(tiny_model("gpt2", width=16, seed=0), data, q, RECIPE, tmp_path, progress=False)

    first = retrainer()
    measured = first.log_probs(rows)
    assert first.log_probs(rows[::-1]).tolist() == measured.tolist() and first.trained == 1  # same set, any order
    resumed = retrainer()  # a new process over the same folder
    assert resumed.log_probs(rows).tolist() == measured.tolist() and resumed.trained == 0
    run = tmp_path / "runs" / first.key(rows)
    (run / "log_probs.json").unlink()  # killed after saving the weights, before measuring
    assert resumed.log_probs(rows).tolist() == measured.tolist() and resumed.trained == 0
    more = tokenize_queries(tokenizer, [Query("the king", " wrote a book"), Query("a small", " red tower")], 24)
    cached = retrainer(more)
    extended = cached.log_probs(rows)  # a new query, measured on the kept model
    assert cached.trained == 0 and extended[0] == measured[0]
    fresh = Retrainer(tiny_model("gpt2", width=16, seed=0), data, more, RECIPE, tmp_path / "elsewhere", progress=False)
    assert fresh.log_probs(rows).tolist() == extended.tolist() and fresh.trained == 1
    assert first.log_probs(np.arange(len(data)))[0] != measured[0]  # other rows, another model


def test_every_preconditioner_equals_its_definition_on_explicit_gradients_in_float64(tokenizer, tmp_path):
    model = tiny_model("gpt2", width=8, seed=0, dtype=torch.float64)
    texts = random_texts(10, seed=4)
    train_set = tokenize_texts(tokenizer, texts, max_length=24)
    asked = [Query("the king of the north", " wrote a book"), Query("music by", " the old composer")]
    queries = tokenize_queries(tokenizer, asked, 24)
    specs = select_layers(model)
    losses, optimizer = train(model, train_set, TrainRecipe(steps=3, batch_size=4, lr=1e-3), progress=False)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    g_z, g_q = autograd_gradients(model, train_set, specs), autograd_gradients(model, queries, specs)

    def dot(a, b):
        return sum(torch.einsum("qoi,noi->qn", a[s.name], b[s.name]) for s in specs).numpy()

    def run(method, **kw):
        return training_scores(method, model, specs, train_set, queries, progress=False, **kw)

    np.testing.assert_allclose(run("identity"), dot(g_q, g_z), rtol=1e-5)
    norms = [np.sqrt(sum((g[s.name] ** 2).sum((1, 2)) for s in specs).numpy()) for g in (g_q, g_z)]
    np.testing.assert_allclose(run("cosine"), dot(g_q, g_z) / np.outer(*norms), rtol=1e-5)
    params, state = dict(model.named_parameters()), optimizer.state
    scale = {}
    for s in specs:  # √v̂ + ε from the live optimizer, bias-corrected, laid out as the gradient (bias last)
        weight, bias = params[f"{s.name}.weight"], params[f"{s.name}.bias"]
        v = [state[p]["exp_avg_sq"] / (1 - 0.999 ** float(state[p]["step"])) for p in (weight, bias)]
        scale[s.name] = torch.cat([v[0].T, v[1][:, None]], 1).sqrt() + ADAM_EPS
    np.testing.assert_allclose(run("adam", optimizer_state=tmp_path / "optimizer.pt"),
                               dot({k: g / scale[k] for k, g in g_q.items()}, {k: g / scale[k] for k, g in g_z.items()}), rtol=1e-5)
    factors = fit_factors(model, train_set, specs, progress=False)
    np.testing.assert_allclose(run("ekfac", factors=factors), compute_scores(model, factors, train_set, queries, progress=False).scores, rtol=1e-5)
    vectorizer = TfidfVectorizer(**_PARAMS)
    matrix = vectorizer.fit_transform(texts)
    np.testing.assert_allclose(run("tfidf", train_texts=texts, query_texts=[q.prompt + q.completion for q in asked]),
                               (vectorizer.transform([q.prompt + q.completion for q in asked]) @ matrix.T).toarray(), rtol=1e-5)
    with pytest.raises(GradIndexError, match="adam needs the optimizer's state file"):
        run("adam")
    other = tiny_model("gpt2", width=8, layers=1, seed=0, dtype=torch.float64)
    torch.save(torch.optim.AdamW(other.parameters()).state_dict(), tmp_path / "other.pt")
    with pytest.raises(GradIndexError, match="optimizer state for .* parameters, the model has"):
        run("adam", optimizer_state=tmp_path / "other.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 saved at its initialisation and after training by RECIPE on 16 texts."""
    root = tmp_path_factory.mktemp("validate")
    tokenizer = word_tokenizer()
    texts = random_texts(16, seed=2)
    model = tiny_model("gpt2", width=16, seed=0)
    for name in ("init", "trained"):
        if name == "trained":
            train(model, tokenize_texts(tokenizer, texts, max_length=1024), RECIPE, progress=False)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    RECIPE.save(root)
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in [
        {"prompt": "the king of the north", "completion": " wrote a book", "group": "facts"},
        {"prompt": "music by", "completion": " the old composer", "group": "text"}]))
    return root


def _validate(root, *extra, out="out"):
    return CliRunner().invoke(app, ["validate", str(root / "trained"), "--init", str(root / "init"), "--recipe", str(root / "recipe.json"),
                                    "--data", str(root / "train.jsonl"), "--queries", str(root / "queries.jsonl"), "--out", str(root / out), *extra])


def test_validate_reports_lds_and_leave_out_and_a_rerun_retrains_nothing(trained):
    args = ("--methods", "ekfac,identity,tfidf", "--subsets", "3", "--leave-out", "2,4", "--leave-out-queries", "1")
    result = _validate(trained, *args)
    assert result.exit_code == 0, result.output
    report = json.loads((trained / "out" / "validation.json").read_text())
    assert report["full_retrain_vs_model"] == 0.0  # retraining on every row reproduces the trained model's bits
    assert (report["queries"], report["subsets"], report["rows"], report["leave_out_queries"]) == (2, 3, 16, 1)
    assert set(report["preconditioners"]) == {"ekfac", "identity", "tfidf", "random"}
    for entry in report["preconditioners"].values():
        assert -1 <= entry["lds"] <= 1 and entry["lds_ci"][0] <= entry["lds_ci"][1] and len(entry["per_query_lds"]) == 2
        assert set(entry["groups"]) == {"facts", "text"} and entry["groups"]["text"]["leave_top2_out"] is None  # text: not asked
        assert np.isfinite(entry["leave_top2_out"]) and np.isfinite(entry["groups"]["facts"]["leave_top4_out"])
        assert entry["per_query_leave_out"]["2"][0] == pytest.approx(entry["leave_top2_out"], abs=1e-4) and entry["per_query_leave_out"]["4"][1] is None
    assert report["retrained_now"] >= 1 + 3
    again = _validate(trained, *args)
    assert again.exit_code == 0 and "(0 retrained now)" in again.output and "ekfac" in again.output
    assert json.loads((trained / "out" / "validation.json").read_text())["preconditioners"] == report["preconditioners"]


@pytest.mark.parametrize("extra, message", [
    (("--methods", "ekfac,influence"), "unknown preconditioner influence"),
    (("--methods", "adam"), "adam needs the optimizer's state file"),
    (("--optimizer-state", "missing.pt"), "cannot read the optimizer state missing.pt"),
    (("--subsets", "2"), "--subsets must be at least 3"),
    (("--fraction", "1.5"), "--fraction must be between 0 and 1"),
    (("--leave-out", "ten"), "--leave-out must be comma-separated integers"),
])
def test_bad_validate_input_is_one_line(trained, extra, message):
    result = _validate(trained, *extra)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_log_probs_are_each_completions_log_likelihood_alone(tokenizer):
    """Batched and padded, each query's log p(completion | prompt) equals the one computed from its own forward."""
    model = tiny_model("gpt2", width=16, seed=3, dtype=torch.float64)
    asked = [Query("the king of the north", " wrote a book"), Query("music", " by the old composer of the south"), Query("a", " red")]
    queries = tokenize_queries(tokenizer, asked, 32)
    for i, q in enumerate(asked):
        prompt = tokenizer(q.prompt)["input_ids"]
        ids = torch.tensor([prompt + tokenizer(q.completion)["input_ids"]])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        expected = sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
        assert log_probs(model, queries, token_budget=40)[i] == pytest.approx(expected, rel=1e-12)


def test_validate_leaves_out_the_index_answers_and_refuses_an_index_of_other_rows(trained):
    build = ["build", str(trained / "trained"), "--data", str(trained / "train.jsonl"), "--truncate", "--budget", "8K", "--stage1-dim", "64"]
    assert CliRunner().invoke(app, [*build, "--out", str(trained / "idx")]).exit_code == 0
    result = _validate(trained, "--methods", "ekfac", "--subsets", "3", "--leave-out", "3", "--index", str(trained / "idx"), out="with_index")
    assert result.exit_code == 0, result.output
    entries = json.loads((trained / "with_index" / "validation.json").read_text())["preconditioners"]
    assert "lds" not in entries["index"] and len(entries["index"]["per_query_leave_out"]["3"]) == 2
    # the cascade finds exact EK-FAC's top 3 on this tiny index, so it removes the same rows: the same cached retraining
    assert entries["index"]["per_query_leave_out"] == entries["ekfac"]["per_query_leave_out"]
    (trained / "other.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in random_texts(16, seed=9)))
    other = ["build", str(trained / "trained"), "--data", str(trained / "other.jsonl"), "--truncate", "--budget", "8K", "--stage1-dim", "64"]
    assert CliRunner().invoke(app, [*other, "--out", str(trained / "other_idx")]).exit_code == 0
    refused = _validate(trained, "--methods", "tfidf", "--subsets", "3", "--index", str(trained / "other_idx"), out="with_index")
    assert refused.exit_code == 2 and "are not the 16 sequences of the data" in refused.output


def test_a_killed_validation_continues_where_it_stopped(trained, tmp_path):
    """SIGKILL in the middle of the retrainings; the rerun trains only what was missing and reports what an
    uninterrupted run reports."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    recipe = TrainRecipe(**{**RECIPE.__dict__, "steps": 20})
    recipe.save(tmp_path)
    args = ["validate", str(trained / "trained"), "--init", str(trained / "init"), "--recipe", str(tmp_path / "recipe.json"),
            "--data", str(trained / "train.jsonl"), "--queries", str(trained / "queries.jsonl"), "--methods", "identity,tfidf",
            "--subsets", "6", "--leave-out", "2"]
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-m", "cli.main", *args, "--out", str(tmp_path / "killed")], cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "killed").glob("runs/*/log_probs.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    assert process.poll() is None, "finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed").glob("runs/*/log_probs.json")))
    assert not (tmp_path / "killed" / "validation.json").exists() and done >= 2
    resumed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "killed")])
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert resumed.exit_code == 0 and whole.exit_code == 0, resumed.output + whole.output
    resumed, whole = (json.loads((tmp_path / name / "validation.json").read_text()) for name in ("killed", "whole"))
    assert resumed["retrained_now"] <= whole["retrained_now"] - done + 1  # at most the run the kill interrupted is redone
    assert resumed["preconditioners"] == whole["preconditioners"]


def test_validate_without_leave_out_reports_the_lds_only(trained):
    result = _validate(trained, "--methods", "tfidf", "--subsets", "3", "--leave-out", "", out="lds_only")
    assert result.exit_code == 0, result.output
    entry = json.loads((trained / "lds_only" / "validation.json").read_text())["preconditioners"]["tfidf"]
    assert "lds" in entry and entry["per_query_leave_out"] == {} and not any(k.startswith("leave_top") for k in entry)
