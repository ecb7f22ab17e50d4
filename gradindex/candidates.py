"""Which texts the exact rerank rescores: the index's own best by stage-2 score, the most TF-IDF-similar
to the query (the paper's lexical filter), or half of each; copies of one text count once and share one
rescore. Also how sure an answer is: the unrescored candidates' chance of belonging in it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .data import Query
from .errors import GradIndexError
from .lexical import Lexical
from .options import CANDIDATE_SOURCES
from .reader import ShardReader
from .store import read_lexical, write_lexical


@dataclass
class Shortlist:
    """The rows to rescore exactly, copies of a kept text included, grouped by text.

    ``groups[g]`` lists positions into ``rows`` holding one text, its first the representative that is
    rescored for all of them; ``token_ids[i]`` are the stored tokens of ``rows[i]``.
    """

    rows: np.ndarray
    token_ids: list[list[int]]
    groups: list[list[int]] = field(default_factory=list)

    @property
    def representatives(self) -> np.ndarray:
        return self.rows[[g[0] for g in self.groups]]


class Candidates:
    """Shortlists over one index's rows; the TF-IDF is loaded (or fitted) the first time it is needed."""

    def __init__(self, reader: ShardReader, content_fingerprint: str, generation: int = 1):
        self.reader = reader
        self.content_fingerprint, self.generation = content_fingerprint, generation
        self._lexical: Lexical | None = None

    def lexical(self) -> Lexical:
        """The TF-IDF of every live text (written at build time; rebuilt from the metadata if missing)."""
        if self._lexical is None:
            lexical = read_lexical(self.reader.root, self.content_fingerprint, self.generation)
            if lexical is None:
                lexical = Lexical.fit(self.reader.texts(), self.reader.removed)
                try:
                    write_lexical(self.reader.root, lexical, self.content_fingerprint, self.generation)
                except (OSError, GradIndexError):
                    pass  # a read-only index keeps it in memory
            self._lexical = lexical
        return self._lexical

    def shortlist(self, by_stage2: np.ndarray, query: Query, k2: int, source: str = "index") -> Shortlist:
        """The k2 distinct texts to rescore: from ``by_stage2`` (rows, best first), from TF-IDF similarity
        to the query's text, or the index's best half then TF-IDF's."""
        if source not in CANDIDATE_SOURCES:
            raise GradIndexError(f"candidates must be one of {', '.join(CANDIDATE_SOURCES)}; got {source!r}")
        out = Shortlist(np.zeros(0, dtype=np.int64), [])
        rows: list[int] = []
        seen: set[int] = set()
        group_of: dict[tuple, int] = {}

        def take(ranked: np.ndarray, limit: int, chunk: int) -> None:
            for start in range(0, len(ranked), chunk):
                part = ranked[start : start + chunk]
                part = part[~self.reader.is_removed(part)] if len(self.reader.removed) else part  # a removed row is never an answer
                for row, seq in zip(part.tolist(), self.reader.token_ids(part)):
                    key = tuple(seq)
                    if key not in group_of:
                        if len(out.groups) >= limit:
                            continue
                        group_of[key] = len(out.groups)
                        out.groups.append([])
                    elif row in seen:
                        continue
                    out.groups[group_of[key]].append(len(rows))
                    rows.append(row)
                    seen.add(row)
                    out.token_ids.append(seq)
                if len(out.groups) >= limit:
                    return

        if source != "tfidf":
            take(by_stage2, k2 if source == "index" else (k2 + 1) // 2, max(1, len(by_stage2)))
        if source != "index" and len(out.groups) < k2:
            take(self.lexical().ranking(f"{query.prompt}{query.completion}"), k2, 1024)
        out.rows = np.asarray(rows, dtype=np.int64)
        return out


UNCERTAIN_MISSES = 0.5  # expected misses from which a result carries a warning


def expected_missed(stage2_rows: np.ndarray, stage2_scores: np.ndarray, rescored_rows: np.ndarray, rescored_stage2: np.ndarray,
                    rescored_exact: np.ndarray, k: int, sign: float, outside_scores: np.ndarray | None = None,
                    outside_weight: float = 0.0) -> tuple[float, float]:
    """Expected number of the true top k that the cascade left out (at most k), and the part of it that stage 1
    never returned.

    The rescored candidates show how exact scores follow the stage-2 estimates: a least-squares line
    exact ≈ a + b·estimate (a code keeps part of every score, so b ≠ 1) with residual spread σ; a row left
    unrescored with estimate s then beats the cut c with probability Φ((a + b·s − c)/σ), signs flipped for
    opponents. That sum runs over the stage-2 candidates left unrescored and, for the rows stage 1 did not
    return, over ``outside_scores``: the stage-2 estimates of a random sample of them, each standing for
    ``outside_weight`` rows. ``gradindex eval`` compares both with the misses brute force finds.
    """
    if k == 0 or len(rescored_rows) < 3:
        return 0.0, 0.0
    exact, estimate = sign * rescored_exact.astype(np.float64), sign * rescored_stage2.astype(np.float64)
    cut = np.sort(exact)[::-1][min(k, len(exact)) - 1]
    slope, intercept = np.polyfit(estimate, exact, 1) if np.ptp(estimate) > 0 else (0.0, float(exact.mean()))
    residual = exact - (intercept + slope * estimate)
    spread = max(float(np.sqrt(np.mean(residual**2))), 1e-12 * max(1.0, float(np.abs(exact).max())))

    def beats(scores: np.ndarray) -> float:
        z = torch.from_numpy((intercept + slope * sign * scores.astype(np.float64) - cut) / spread)
        return float(torch.special.ndtr(z).sum())

    inside = beats(stage2_scores[~np.isin(stage2_rows, rescored_rows)])
    outside = outside_weight * beats(outside_scores) if outside_scores is not None and len(outside_scores) else 0.0
    total = inside + outside
    return min(float(k), total), (min(float(k), total) * outside / total if total > 0 else 0.0)
