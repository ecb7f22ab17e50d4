"""Analyses over the whole training set (Grosse et al. 2023 §5): how concentrated a query's influence is,
and which sequences have the highest self-influence.

Exact influence of every sequence costs a pass over the training set, so the usual input is a stratified
estimate (``estimated_influence``): the cascade's shortlists, scored exactly, stand for themselves, and a
uniform sample of the other sequences, scored exactly, stands for the rest. Scores carry weights (how
many sequences each one stands for) through ``share_curve`` and ``sparsity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import Query
from .errors import GradIndexError
from .scores import query_gradients

if TYPE_CHECKING:
    from .search import GradIndex, QueryResult

TOP_FRACTIONS = (0.001, 0.01, 0.1)
DEFAULT_SAMPLE = 1000


@dataclass
class Sparsity:
    """How much of a query's total |influence| the most influential sequences carry."""

    top_share: dict[float, float]  # fraction of sequences (by |influence|) → their share of Σ|influence|
    tail_exponent: float  # α in |I|(rank) ≈ c · rank^(−α), fitted over ranks 10 … N/10
    n: int  # sequences described (the total weight)


def share_curve(scores: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most influential first: (sorted |influence|, fraction of sequences up to each, share of Σ|I| up to each)."""
    magnitude = np.abs(np.asarray(scores, dtype=np.float64))
    weights = np.ones_like(magnitude) if weights is None else np.asarray(weights, dtype=np.float64)
    if magnitude.shape != weights.shape:
        raise GradIndexError(f"{len(weights)} weights for {len(magnitude)} scores")
    order = np.argsort(-magnitude, kind="stable")
    magnitude, weights = magnitude[order], weights[order]
    mass = np.cumsum(magnitude * weights)
    return magnitude, np.cumsum(weights) / weights.sum(), mass / max(mass[-1], 1e-300)


def sparsity(scores: np.ndarray, fractions=TOP_FRACTIONS, weights: np.ndarray | None = None) -> Sparsity:
    """Concentration of one query's influence over N training sequences: ``scores`` of all N, or of some
    with ``weights`` saying how many sequences each stands for."""
    magnitude, taken, share = share_curve(scores, weights)
    n = len(magnitude) if weights is None else float(np.sum(weights))
    if n < 100 or share[-1] == 0:
        raise GradIndexError(f"sparsity needs at least 100 non-zero scores, got {n:g} scores summing to {magnitude.sum():g} in magnitude")
    # Reading the curve at rank round(f·N) is exact for unit weights; weighted points interpolate.
    top = {f: float(np.interp(max(1, round(f * n)) / n, np.r_[0.0, taken], np.r_[0.0, share])) for f in fractions}
    counts = np.diff(np.r_[0.0, taken * n])
    ranks = taken * n - (counts - 1) / 2  # a point standing for w sequences sits mid-way through their ranks
    keep = (ranks >= 10) & (ranks <= max(10, n // 10)) & (magnitude > 0)
    # A point standing for w sequences counts as w of them in the least squares.
    slope = np.polyfit(np.log(ranks[keep]), np.log(magnitude[keep]), 1, w=np.sqrt(counts[keep]))[0]
    return Sparsity(top_share=top, tail_exponent=float(-slope), n=int(round(n)))


def estimated_influence(index: "GradIndex", results: list["QueryResult"], sample: int = DEFAULT_SAMPLE, *, seed: int = 0,
                        damping: float | None = None, damping_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, weights) standing for one query's influence on every indexed sequence.

    ``results``: that query's cascades run with ``trace=True`` and without ``cosine`` (proponents and
    opponents: together the top of both signs), whose rescored rows keep their exact scores; ``sample`` other rows drawn
    uniformly and scored exactly stand for the remaining ones in equal shares (all of them if fewer).
    """
    if not results or any(r.trace is None for r in results):
        raise GradIndexError("estimated_influence needs the query's results run with trace=True")
    if not isinstance(sample, (int, np.integer)) or isinstance(sample, bool) or sample < 1:
        raise GradIndexError(f"the sparsity sample must be a positive number of sequences, got {sample!r}")
    known: dict[int, float] = {}
    for r in results:
        known.update(zip(r.trace.shortlist_rows.tolist(), r.trace.stage3_scores.tolist()))
    rest = np.setdiff1d(index.reader.live_rows(), np.fromiter(known, dtype=np.int64, count=len(known)))
    drawn = np.sort(np.random.default_rng(seed).choice(rest, min(sample, len(rest)), replace=False))
    query = Query(results[0].prompt, results[0].completion)
    scored = index.all_scores([query], rows=drawn, damping=damping, damping_scale=damping_scale)[0] if len(drawn) else np.zeros(0)
    scores = np.r_[np.fromiter(known.values(), dtype=np.float64, count=len(known)), scored]
    weights = np.r_[np.ones(len(known)), np.full(len(drawn), len(rest) / max(len(drawn), 1))]
    return scores, weights


def outliers(index: "GradIndex", n: int = 20, *, exact: bool = False, damping: float | None = None,
             damping_scale: float | None = None) -> list[tuple[int, float, str]]:
    """The ``n`` sequences of highest self-influence I(z, z) = |W(G_z)|². Stored: the codes' squared norms
    (the part of I(z, z) on the entries each code keeps, never more). ``exact`` rescores the best
    ``max(4n, n + 50)`` of those with the given damping, as ``scores`` would, and ranks them again."""
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= index.n:
        raise GradIndexError(f"n must be between 1 and the {index.n} sequences in the index, got {n}")
    stored = index.reader.self_influence()
    rows = np.argsort(-stored, kind="stable")[: max(4 * n, n + 50) if exact else n]
    values = stored[rows]
    if exact:
        values = np.concatenate([_self_influence(index, rows[i : i + SELF_CHUNK], damping, damping_scale)
                                 for i in range(0, len(rows), SELF_CHUNK)])
        order = np.argsort(-values, kind="stable")[:n]
        rows, values = rows[order], values[order]
    texts = index.reader.rows(rows, ("text",))["text"]
    return [(int(r), float(v), t) for r, v, t in zip(rows, values, texts)]


SELF_CHUNK = 8  # rows whose preconditioned gradients are held at once (each is as large as the tracked layers)


def _self_influence(index: "GradIndex", rows: np.ndarray, damping: float | None, damping_scale: float | None) -> np.ndarray:
    data = index.training_set(rows)
    p = query_gradients(index.lm.model, index.factors, data, token_budget=index.token_budget, damping=damping, damping_scale=damping_scale)
    return np.diag(index.rescore(p, data).scores).astype(np.float64)
