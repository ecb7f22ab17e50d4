"""What a query returns, and its one JSON form: ``Hit``, ``Trace``, ``QueryResult``, the text ``gradindex query``
prints and the object ``query --json``, the server and its client exchange (``to_dict``/``from_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

UNCERTAIN_MISSES = 0.5  # expected misses from which a result carries a warning


@dataclass
class Hit:
    """One training sequence in a query's answer."""

    row: int  # global row id in the index
    score: float  # exact EK-FAC influence (cosine-normalised with ``cosine=True``)
    approx_score: float  # stage-2 low-rank estimate, same normalisation
    stage1_score: float  # the stage-1 inner product (heavier damping: comparable within a query only)
    text: str
    source: str
    offset: int  # the row's document: its row in ``source``
    per_layer: dict[str, float]
    start: int = 0  # the token of that document where this row's window starts (0: the whole document)
    tokens: list[str] | None = None
    token_scores: list[float] | None = None  # sum to ``score`` (unnormalised) over the sequence's tokens
    copies: list[int] = field(default_factory=list)  # with ``distinct=True``: other rows holding the same text


@dataclass
class Trace:
    """Every stage's rows and scores (with ``trace=True``), for ``eval`` and the analyses."""

    stage1_rows: np.ndarray  # the k1 FAISS candidates, in FAISS order
    stage1_scores: np.ndarray
    stage2_scores: np.ndarray  # of every stage-1 candidate
    shortlist_rows: np.ndarray  # every row rescored exactly (copies of a shortlisted text included)
    stage3_scores: np.ndarray  # their exact scores (copies share their text's)
    hit_rows: np.ndarray  # the final k
    hit_scores: np.ndarray


@dataclass
class QueryResult:
    prompt: str
    completion: str
    opponents: bool
    hits: list[Hit]
    seconds: dict[str, float] = field(default_factory=dict)
    trace: Trace | None = None
    expected_missed: float = 0.0  # how many of the true top k the cascade may have missed (``candidates.expected_missed``) …
    missed_outside_stage1: float = 0.0  # … of which among the rows stage 1 did not return (estimated from a sample)

    @property
    def uncertain(self) -> bool:
        return self.expected_missed >= UNCERTAIN_MISSES

    @property
    def note(self) -> str:
        """The warning an unsure answer carries ('' when sure)."""
        if not self.uncertain:
            return ""
        if self.missed_outside_stage1 >= self.expected_missed / 2:
            return (f"the index may have missed about {self.expected_missed:.1f} of the true top {len(self.hits)} "
                    "(rows that stage 1 did not return may beat the cut); raise --k1 and --k2 to check")
        return (f"the index may have missed about {self.expected_missed:.1f} of the true top {len(self.hits)} "
                "(candidates close to the cut were not rescored exactly); raise --k2 to check")

    def to_dict(self) -> dict:
        """The JSON object of this result (without the trace): one line of ``gradindex query --json``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("hits", "trace")}
        return {**out, "hits": [asdict(h) for h in self.hits], "uncertain": self.uncertain}

    @classmethod
    def from_dict(cls, d: dict) -> "QueryResult":
        """The result :meth:`to_dict` wrote (what ``query --server`` reads back)."""
        names = {f.name for f in fields(cls)} - {"hits", "trace"}
        return cls(**{k: v for k, v in d.items() if k in names}, hits=[Hit(**h) for h in d["hits"]])

    def summary(self) -> str:
        """What ``gradindex query`` prints: one line per hit (and its strongest tokens, when scored per token)."""
        lines = [f"{self.prompt!r} → {self.completion!r}: top {len(self.hits)} {'opponents' if self.opponents else 'proponents'} "
                 f"({self.seconds.get('total', 0) * 1000:.0f} ms)"]
        if self.uncertain:
            lines.append(f"  note: {self.note}")
        for position, h in enumerate(self.hits, 1):
            copies = f" (×{len(h.copies) + 1})" if h.copies else ""
            window = f" (document {h.offset}, token {h.start})" if h.start or h.offset != h.row else ""
            lines.append(f"{position:3d}. {h.score:+.4g}  row {h.row}{window}{copies}  {one_line(h.text)}")
            if h.tokens:
                best = sorted(np.argsort(-np.abs(h.token_scores))[:5])
                lines.append("       tokens: " + ", ".join(f"{h.tokens[t]!r} {h.token_scores[t]:+.3g}" for t in best))
        return "\n".join(lines)


def one_line(text: str, width: int = 100) -> str:
    """A text flattened to one line of at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat[:width] + ("…" if len(flat) > width else "")
