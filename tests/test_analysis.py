"""Influence analyses against hand computations and synthetic data of known shape."""

import numpy as np
import pytest

from gradindex.analysis import estimated_influence, share_curve, sparsity
from gradindex.errors import GradIndexError


def test_top_shares_are_the_largest_magnitudes_over_the_total():
    scores = np.array([10.0, -5.0] + [1.0] * 998)  # signs do not matter, magnitudes do
    s = sparsity(scores, fractions=(0.001, 0.002, 0.01))
    total = 10 + 5 + 998
    assert s.top_share[0.001] == pytest.approx(10 / total)
    assert s.top_share[0.002] == pytest.approx(15 / total)
    assert s.top_share[0.01] == pytest.approx((15 + 8) / total)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_power_law_exponent_is_recovered(alpha):
    ranks = np.arange(1, 20_001)
    scores = ranks ** -alpha * np.where(ranks % 3 == 0, -1.0, 1.0)
    rng = np.random.default_rng(0)
    assert sparsity(rng.permutation(scores)).tail_exponent == pytest.approx(alpha, rel=1e-6)


def test_too_few_scores_are_refused():
    with pytest.raises(GradIndexError, match="at least 100"):
        sparsity(np.ones(10))
    with pytest.raises(GradIndexError):
        sparsity(np.zeros(1000))


def test_weights_count_as_that_many_copies():
    rng = np.random.default_rng(1)
    values = rng.standard_cauchy(300)
    weights = rng.integers(1, 20, 300)
    weighted, repeated = sparsity(values, weights=weights), sparsity(np.repeat(values, weights))
    assert weighted.n == repeated.n == weights.sum()
    for f, share in repeated.top_share.items():
        assert weighted.top_share[f] == pytest.approx(share, rel=1e-9)
    assert weighted.tail_exponent == pytest.approx(repeated.tail_exponent, rel=0.05)
    magnitude, taken, share = share_curve(values)
    assert np.all(np.diff(magnitude) <= 0) and taken[-1] == share[-1] == pytest.approx(1.0)
    assert share[0] == pytest.approx(np.abs(values).max() / np.abs(values).sum())


def test_estimated_influence_is_exact_scores_of_the_shortlists_and_a_weighted_sample(index, exact):
    from tiny import N

    pro = index.query("the king of the north", " wrote a book", k=3, k1=30, k2=5, trace=True)
    con = index.query("the king of the north", " wrote a book", k=3, k1=30, k2=5, opponents=True, trace=True)
    known = set(pro.trace.shortlist_rows.tolist()) | set(con.trace.shortlist_rows.tolist())
    scores, weights = estimated_influence(index, [pro, con], sample=20, seed=3)
    tol = {"rel": 1e-4, "abs": 1e-5 * float(np.abs(exact[0]).max())}  # float32 sums batched differently
    assert len(scores) == len(known) + 20 and weights.sum() == pytest.approx(N)
    assert np.all(weights[: len(known)] == 1) and np.allclose(weights[len(known):], (N - len(known)) / 20)
    # Every score is some row's exact score; the shortlisted rows' ones come first.
    assert sorted(scores[: len(known)]) == pytest.approx(sorted(exact[0, sorted(known)]), **tol)
    assert all(np.isclose(exact[0], s, rtol=tol["rel"], atol=tol["abs"]).any() for s in scores[len(known):])
    # A sample as large as the rest is the whole set, exactly.
    everything, ones = estimated_influence(index, [pro, con], sample=N)
    assert np.all(ones == 1) and sorted(everything) == pytest.approx(sorted(exact[0]), **tol)
    with pytest.raises(GradIndexError, match="positive number of sequences"):
        estimated_influence(index, [pro, con], sample=0)
    with pytest.raises(GradIndexError, match="trace=True"):
        estimated_influence(index, [index.query("the king", " wrote", k=2)])
