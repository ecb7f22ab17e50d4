"""Influence analyses against hand computations and synthetic data of known shape."""

import numpy as np
import pytest

from gradindex.analysis import sparsity
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
