"""Analyses of a query's influence over the training set (Grosse et al. 2023 §5): how concentrated it is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GradIndexError

TOP_FRACTIONS = (0.001, 0.01, 0.1)


@dataclass
class Sparsity:
    """How much of a query's total |influence| the most influential sequences carry."""

    top_share: dict[float, float]  # fraction of sequences (by |influence|) → their share of Σ|influence|
    tail_exponent: float  # α in |I|(rank) ≈ c · rank^(−α), fitted over ranks 10 … N/10
    n: int


def sparsity(scores: np.ndarray, fractions=TOP_FRACTIONS) -> Sparsity:
    """Concentration of one query's influence over all N training sequences (``scores``: shape (N,))."""
    magnitude = np.sort(np.abs(np.asarray(scores, dtype=np.float64)))[::-1]
    n = len(magnitude)
    total = magnitude.sum()
    if n < 100 or total == 0:
        raise GradIndexError(f"sparsity needs at least 100 non-zero scores, got {n} scores summing to {total:g} in magnitude")
    cumulative = np.cumsum(magnitude)
    share = {f: float(cumulative[max(1, int(round(f * n))) - 1] / total) for f in fractions}
    ranks = np.arange(1, n + 1)
    tail = slice(9, max(10, n // 10))
    keep = magnitude[tail] > 0
    slope = np.polyfit(np.log(ranks[tail][keep]), np.log(magnitude[tail][keep]), 1)[0]
    return Sparsity(top_share=share, tail_exponent=float(-slope), n=n)
