"""gradindex against kronfluence, the paper authors' EK-FAC implementation, as an independent reference.

On a briefly trained tiny GPT-2 (Conv1D, swapped for nn.Linear on kronfluence's side) and a tiny Llama:
- each tool's own true-Fisher fit and scores agree up to label-sampling noise
  (median per-query Spearman ≥ 0.99, overall Pearson ≥ 0.998);
- gradindex's scorer fed kronfluence's own factors reproduces kronfluence's scores (≤ 1e-4 relative);
- with the same labels (gradindex's per-row sampled labels, or the data's own for the empirical Fisher)
  the two fits are the same factors up to rounding: what is left in the first comparison is sampling noise.

Run with ``pytest -s`` to see the measured numbers. Everything is float64 and single-threaded
(tiny matrices gain nothing from threads, and a busy machine makes spinning threads very slow).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

pytest.importorskip("kronfluence")
pytest.importorskip("scipy")

from scipy.stats import spearmanr  # noqa: E402

from benchmarks.kronfluence_ref import (  # noqa: E402
    factors_from_kronfluence,
    kronfluence_fit,
    kronfluence_scores,
    linearize,
    markov_texts,
    train_briefly,
)
from gradindex.data import Query, TokenizedSet, tokenize_queries, tokenize_texts  # noqa: E402
from gradindex.factors import Factors
from gradindex.fitting import fit_factors  # noqa: E402
from gradindex.layers import select_layers  # noqa: E402
from gradindex.scores import compute_scores  # noqa: E402
from tiny import WORDS, tiny_model, word_tokenizer  # noqa: E402

# kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (disabled on CPU), which torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")

# Training sequences per architecture for the independent-sample comparison. Λ is a mean over
# sequences, so two independent label samples differ by O(1/√N): at 1,000 GPT-2 sequences the
# Pearson is ≈ 0.993, at 4,000 ≈ 0.998–0.999, at 6,000 ≈ 0.9992 (seed to seed).
N_TRAIN = {"gpt2": 6000, "llama": 4000}
N_QUERIES = 10
MAX_LENGTH = 32
KRONFLUENCE_BATCH = 256  # sequences; gradindex gets the same in tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Setup:
    kind: str
    model: torch.nn.Module
    pad_id: int
    train: TokenizedSet
    queries: TokenizedSet
    specs: list


@functools.lru_cache(maxsize=None)
def _trained_weights(kind: str) -> dict:
    tok = word_tokenizer()
    model = tiny_model(kind, width=32, layers=2, vocab=len(tok), seed=0)
    data = tokenize_texts(tok, markov_texts(WORDS, 2000, seed=0), MAX_LENGTH)
    losses = train_briefly(model, data, steps=200, lr=1e-2)
    assert np.mean(losses[-20:]) < 0.5 * losses[0], "the tiny model did not learn"
    return {k: v.double() for k, v in model.state_dict().items()}


def trained_setup(kind: str, n_train: int) -> Setup:
    """A tiny model of ``kind`` trained for a couple of seconds on a bigram chain, in float64, with data from it."""
    tok = word_tokenizer()
    pad = tok.pad_token_id
    model = tiny_model(kind, width=32, layers=2, vocab=len(tok), seed=0, dtype=torch.float64)
    model.load_state_dict(_trained_weights(kind))
    train = tokenize_texts(tok, markov_texts(WORDS, n_train, seed=1), MAX_LENGTH)
    texts = markov_texts(WORDS, N_QUERIES, seed=2, lo=6, hi=10)
    queries = tokenize_queries(tok, [Query(" ".join(t.split()[:3]), " " + " ".join(t.split()[3:])) for t in texts], MAX_LENGTH)
    return Setup(kind, model, pad, train, queries, select_layers(model, "mlp"))


def gradindex_scores(s: Setup, factors: Factors) -> np.ndarray:
    return compute_scores(
        s.model, factors, s.train, s.queries, token_budget=KRONFLUENCE_BATCH * MAX_LENGTH, progress=False
    ).scores.astype(np.float64)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(median per-query Spearman, worst per-query Spearman, overall Pearson)."""
    rho = [spearmanr(x, y)[0] for x, y in zip(a, b)]
    return float(np.median(rho)), float(np.min(rho)), float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def relative_error_on_large(ours: np.ndarray, ref: np.ndarray, fraction: float = 0.01) -> float:
    """Largest |ours - ref| / |ref| over entries above ``fraction`` of their query's largest |ref|."""
    large = np.abs(ref) > fraction * np.abs(ref).max(axis=1, keepdims=True)
    return float((np.abs(ours - ref) / np.abs(ref))[large].max())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def compared(request, tmp_path_factory):
    s = trained_setup(request.param, N_TRAIN[request.param])
    ours = fit_factors(s.model, s.train, s.specs, token_budget=KRONFLUENCE_BATCH * MAX_LENGTH, seed=0, progress=False)
    ours_scores = gradindex_scores(s, ours)
    analyzer = kronfluence_fit(
        s.model, [x.name for x in s.specs], s.train, s.pad_id, tmp_path_factory.mktemp(f"kf-{s.kind}"), KRONFLUENCE_BATCH, seed=1
    )
    ref_scores = kronfluence_scores(analyzer, s.train, s.queries, s.pad_id, train_batch_size=KRONFLUENCE_BATCH)
    ref_factors = factors_from_kronfluence(analyzer, "ekfac", s.specs, train_set=s.train)
    return s, ours, ours_scores, ref_factors, ref_scores


def test_linearize_keeps_outputs_and_names():
    model = tiny_model("gpt2", width=16, dtype=torch.float64)
    linear = linearize(model)
    ids = torch.randint(0, 100, (2, 7))
    assert torch.allclose(model(input_ids=ids).logits, linear(input_ids=ids).logits, atol=1e-12)
    conv = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert conv and all(isinstance(linear.get_submodule(n), torch.nn.Linear) for n in conv)
    assert type(model.get_submodule(next(iter(conv)))).__name__ == "Conv1D"  # the original is untouched


def test_own_fits_agree_up_to_sampling_noise(compared):
    s, _, ours, _, ref = compared
    median, worst, pearson = agreement(ours, ref)
    print(
        f"\n[{s.kind}] own fits, {len(s.train)} train × {len(s.queries)} queries: "
        f"median Spearman {median:.4f} (worst query {worst:.4f}), Pearson {pearson:.5f}"
    )
    assert median >= 0.99
    assert pearson >= 0.998


def test_scorer_on_kronfluence_factors_matches_kronfluence(compared):
    s, _, _, ref_factors, ref = compared
    ours = gradindex_scores(s, ref_factors)
    err = relative_error_on_large(ours, ref)
    _, _, pearson = agreement(ours, ref)
    print(f"\n[{s.kind}] gradindex scorer on kronfluence factors: max relative error {err:.2e} (entries > 1% of query max), Pearson {pearson:.10f}")
    assert err <= 1e-4


def test_own_factors_close_to_kronfluence(compared):
    """Same eigenbasis up to sampling noise: Λ means within a few percent, damping consistent."""
    s, ours, _, ref_factors, _ = compared
    for name in ours.layers:
        a, b = float(ours.layers[name].lam.double().mean()), float(ref_factors.layers[name].lam.double().mean())
        assert abs(a - b) / b < 0.05, (name, a, b)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_same_labels_give_the_same_factors(kind, fisher, tmp_path):
    """With identical labels the fits must coincide: any systematic difference (masking, bias column,
    normalisation, damping, orientation) would show here, free of sampling noise."""
    s = trained_setup(kind, 300)
    ours = fit_factors(s.model, s.train, s.specs, fisher=fisher, seed=7, token_budget=64 * MAX_LENGTH, progress=False)
    # The empirical run also feeds kronfluence every row padded to the full length, in file order.
    padded = dict(trim=False, sort_by_length=False, length=MAX_LENGTH) if fisher == "empirical" else {}
    analyzer = kronfluence_fit(
        s.model, [x.name for x in s.specs], s.train, s.pad_id, tmp_path, 64,
        row_seed=7 if fisher == "true" else None, empirical=fisher == "empirical", **padded,
    )
    ref_factors = factors_from_kronfluence(analyzer, "ekfac", s.specs, train_set=s.train)
    worst = 0.0
    for name, f in ours.layers.items():
        lam_ref = ref_factors.layers[name].lam.double()
        worst = max(worst, float((f.lam.double() - lam_ref).norm() / lam_ref.norm()))
    ref = kronfluence_scores(analyzer, s.train, s.queries, s.pad_id, train_batch_size=64, **padded)
    ours_scores = gradindex_scores(s, ours)
    err = relative_error_on_large(ours_scores, ref)
    print(f"\n[{kind}, {fisher} Fisher, same labels] Λ relative difference {worst:.1e}, score max relative error {err:.1e}")
    assert worst < 1e-8
    assert err <= 1e-4
