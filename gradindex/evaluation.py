"""What an index loses: each stage measured against brute-force exact EK-FAC scores of every row."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from .data import Query, as_queries
from .errors import GradIndexError
from .options import QueryOptions
from .search import GradIndex

_DEPTHS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class Side:
    """Averages over queries for proponents (largest influence) or opponents (most negative)."""

    recall_at_k: float  # final top-k vs exact top-k
    stage1_recall: float  # share of the exact top-k among the k1 FAISS candidates
    stage2_recall: float  # … among the k2 kept after low-rank rescoring
    tfidf_recall: float  # … among the k2 texts most TF-IDF-similar to the query (the same budget)
    hybrid_recall: float  # … among the index's best k2/2 and TF-IDF's best after them (the same budget)
    stage1_spearman: float  # stage-1 scores vs exact, on the k1 candidates
    stage2_spearman: float  # stage-2 scores vs exact, on the k1 candidates
    exact_max_rel_diff: float  # stage 3 vs brute force on the returned rows (should be ~1e-6)
    stage1_recall_at_depth: dict[int, float]  # exact top-k inside the stage-1 top-d
    stage2_recall_at_depth: dict[int, float]  # … inside the top-d of the k1 candidates by stage-2 score
    stage2_worst_at_depth: dict[int, float] = field(default_factory=dict)  # … of the worst query: recall@k at k2 = d
    per_query_recall: list[float] = field(default_factory=list)
    worst_recall: float = float("nan")  # the worst query's recall@k
    p5_recall: float = float("nan")  # its 5th percentile over queries
    missed: float = float("nan")  # mean number of the exact top-k missing from the answer …
    expected_missed: float = float("nan")  # … and what the cascade predicted (``QueryResult.expected_missed``)
    missed_outside_stage1: float = float("nan")  # mean number of the exact top-k that stage 1 did not return …
    expected_outside_stage1: float = float("nan")  # … and what the cascade predicted (``QueryResult.missed_outside_stage1``)
    flagged_recall: float = float("nan")  # mean recall@k of the queries the cascade flagged as unsure
    unflagged_recall: float = float("nan")  # … and of the others


@dataclass
class EvalReport:
    k: int
    k1: int
    k2: int
    n_rows: int
    n_queries: int
    proponents: Side
    opponents: Side | None
    latency_p50: float
    latency_p95: float
    stage_seconds: dict[str, float]  # mean per query
    brute_force_seconds: float  # per query, scoring all rows for all queries in one pass
    speedup_p50: float  # brute_force_seconds / latency_p50

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What ``gradindex eval`` prints: recall of every stage per side, latency, and the speed-up."""
        lines = [f"{self.n_queries} queries, {self.n_rows} sequences, k={self.k}, k1={self.k1}, k2={self.k2}",
                 f"{'':12s}{'recall@k':>10s}{'worst':>7s}{'p5':>7s}{'in stage 1':>12s}{'in stage 2':>12s}{'in TF-IDF':>11s}"
                 f"{'in hybrid':>11s}{'ρ stage 1':>11s}{'ρ stage 2':>11s}{'missed':>8s}{'predicted':>11s}{'by stage 1':>12s}{'predicted':>11s}"]
        for name, side in (("proponents", self.proponents), ("opponents", self.opponents)):
            if side is not None:
                lines.append(f"{name:12s}{side.recall_at_k:10.3f}{side.worst_recall:7.2f}{side.p5_recall:7.2f}{side.stage1_recall:12.3f}"
                             f"{side.stage2_recall:12.3f}{side.tfidf_recall:11.3f}{side.hybrid_recall:11.3f}{side.stage1_spearman:11.3f}"
                             f"{side.stage2_spearman:11.3f}{side.missed:8.2f}{side.expected_missed:11.2f}{side.missed_outside_stage1:12.2f}"
                             f"{side.expected_outside_stage1:11.2f}")
        stages = ", ".join(f"{s} {v * 1000:.1f}" for s, v in self.stage_seconds.items())
        return "\n".join(lines + [
            f"(stage 2, TF-IDF and hybrid: the exact top-{self.k} among {self.k2} texts each; missed: of the exact top-{self.k}, "
            "per query, by the answer and by stage 1)",
            f"latency p50 {self.latency_p50 * 1000:.1f} ms, p95 {self.latency_p95 * 1000:.1f} ms (mean ms: {stages})",
            f"brute-force exact: {self.brute_force_seconds * 1000:.1f} ms per query (all queries in one pass); "
            f"p50 speed-up {self.speedup_p50:.1f}×",
        ])


def evaluate(
    index: GradIndex,
    queries: Sequence[Query] | str | Path,
    k: int | None = None,
    *,
    options: QueryOptions | None = None,
    opponents: bool = True,
    exact: np.ndarray | None = None,
    progress: bool = True,
    **overrides,
) -> EvalReport:
    """Run every query through the cascade (with ``options`` and/or its fields as keywords; both sides
    unless ``opponents=False``) and compare each stage with brute-force exact scores."""
    queries = as_queries(queries)
    if not queries:
        raise GradIndexError("no queries to evaluate")
    options = QueryOptions.of(options, k, **overrides).for_index(index.n)
    k = options.k
    brute_seconds = float("nan")
    if exact is None:
        started = time.perf_counter()
        exact = index.all_scores(queries, progress=progress)
        brute_seconds = (time.perf_counter() - started) / len(queries)
    sides, latencies, stages = {}, [], {}
    for sign, name in ((1.0, "proponents"), (-1.0, "opponents")):
        if sign < 0 and not opponents:
            continue
        side = replace(options, opponents=sign < 0)
        rows = []
        for q, query in enumerate(tqdm(queries, desc=f"eval {name}", disable=not progress, unit="query")):
            result = index.query_many([query], options=side, trace=True)[0]
            latencies.append(result.seconds["total"])
            for stage, s in result.seconds.items():
                stages.setdefault(stage, []).append(s)
            truth = true_top(sign * exact[q], k)
            measured = _measure(result.trace, sign * exact[q], truth, k, sign)
            measured["expected_missed"] = result.expected_missed
            measured["expected_outside_stage1"] = result.missed_outside_stage1
            measured["flagged"] = result.uncertain
            by_stage2 = result.trace.stage1_rows[np.argsort(-sign * result.trace.stage2_scores, kind="stable")]
            for source in ("tfidf", "hybrid"):
                measured[f"{source}_recall"] = _recall(truth, index.candidates.shortlist(by_stage2, query, options.k2, source).rows, k)
            rows.append(measured)
        sides[name] = _average(rows)
    return EvalReport(
        k=k, k1=options.k1, k2=options.k2, n_rows=index.n, n_queries=len(queries),
        proponents=sides["proponents"], opponents=sides.get("opponents"),
        latency_p50=float(np.percentile(latencies, 50)), latency_p95=float(np.percentile(latencies, 95)),
        stage_seconds={s: float(np.mean(v)) for s, v in stages.items() if s != "total"},
        brute_force_seconds=brute_seconds, speedup_p50=brute_seconds / float(np.percentile(latencies, 50)),
    )


# Copies of one text score the same up to float32 rounding of differently batched sums (measured spread
# up to 2e-6 relative on the 100k benchmark); any copy is as right as another.
TIE_TOLERANCE = 1e-5


def true_top(exact: np.ndarray, k: int) -> set[int]:
    """The exact top-k, ties included: every row scoring at least the k-th best (within rounding)."""
    kth = exact[top_rows(exact, k)[-1]]
    return set(np.nonzero(exact >= kth - TIE_TOLERANCE * abs(kth))[0].tolist())


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def _measure(trace, exact: np.ndarray, truth: set[int], k: int, sign: float) -> dict:
    """Metrics of one query on one side; ``exact`` and the trace's scores times ``sign`` are larger-is-better;
    ``truth``: the exact top-k (``true_top``)."""
    rows1 = trace.stage1_rows
    by_stage2 = rows1[np.argsort(-sign * trace.stage2_scores, kind="stable")]
    returned = exact[trace.hit_rows]
    rel = np.max(np.abs(sign * trace.hit_scores - returned)) / max(np.max(np.abs(returned)), 1e-30)
    return {
        "k": k,
        "recall_at_k": _recall(truth, trace.hit_rows, k),
        "stage1_recall": _recall(truth, rows1, k),
        "stage2_recall": _recall(truth, trace.shortlist_rows, k),
        "stage1_spearman": _spearman(sign * trace.stage1_scores, exact[rows1]),
        "stage2_spearman": _spearman(sign * trace.stage2_scores, exact[rows1]),
        "exact_max_rel_diff": float(rel),
        "stage1_recall_at_depth": {d: _recall(truth, rows1[:d], k) for d in _DEPTHS if d <= len(rows1)},
        "stage2_recall_at_depth": {d: _recall(truth, by_stage2[:d], k) for d in _DEPTHS if d <= len(rows1)},
    }


def _recall(truth: set, found: np.ndarray, k: int) -> float:
    return min(k, len(truth & set(found.tolist()))) / k


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _average(rows: list[dict]) -> Side:
    def mean(key):
        return float(np.nanmean([r[key] for r in rows]))

    def depth_mean(key, reduce=np.mean):
        depths = sorted(set().union(*(r[key] for r in rows)))
        return {d: float(reduce([r[key][d] for r in rows if d in r[key]])) for d in depths}

    recalls = np.array([r["recall_at_k"] for r in rows])
    flagged = np.array([r["flagged"] for r in rows], dtype=bool)
    return Side(
        recall_at_k=mean("recall_at_k"), stage1_recall=mean("stage1_recall"), stage2_recall=mean("stage2_recall"),
        tfidf_recall=mean("tfidf_recall"), hybrid_recall=mean("hybrid_recall"),
        stage1_spearman=mean("stage1_spearman"), stage2_spearman=mean("stage2_spearman"),
        exact_max_rel_diff=float(np.max([r["exact_max_rel_diff"] for r in rows])),
        stage1_recall_at_depth=depth_mean("stage1_recall_at_depth"), stage2_recall_at_depth=depth_mean("stage2_recall_at_depth"),
        stage2_worst_at_depth=depth_mean("stage2_recall_at_depth", np.min),
        per_query_recall=[r["recall_at_k"] for r in rows],
        worst_recall=float(np.min(recalls)), p5_recall=float(np.percentile(recalls, 5)),
        missed=float(np.mean([(1 - r["recall_at_k"]) * r["k"] for r in rows])), expected_missed=mean("expected_missed"),
        missed_outside_stage1=float(np.mean([(1 - r["stage1_recall"]) * r["k"] for r in rows])),
        expected_outside_stage1=mean("expected_outside_stage1"),
        flagged_recall=_mean_or_nan(recalls[flagged]), unflagged_recall=_mean_or_nan(recalls[~flagged]),
    )


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
