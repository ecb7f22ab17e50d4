"""What a user can set, as typed dataclasses validated in one place: how a query runs, how an index is built.

The CLI, ``query``, ``eval`` and ``report`` all take these, so a setting means the same everywhere and a
bad one gets the same one-line error everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .ann import DEFAULT_MAX_MEMORY
from .codeplan import CompressionConfig
from .data import DEFAULT_TOKEN_BUDGET
from .errors import GradIndexError
from .layers import DEFAULT_MODULES

DEFAULT_K = 10
DEFAULT_K1 = 1000
DEFAULT_K2 = 100
DEFAULT_SHARD_SIZE = 4096
CANDIDATE_SOURCES = ("index", "tfidf", "hybrid")
TOKEN_ENV = "GRADINDEX_TOKEN"  # the bearer token of `gradindex serve` and its clients, when not given


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes from a count or a size such as ``"512M"`` or ``"4GiB"``; ``what`` names it in the error."""
    if _is_count(size):
        return int(size)
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = str(size).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise GradIndexError(f"cannot read {what} {size!r} (e.g. 64K, 512M, 4G)") from None


def parse_part(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Part ``i/n`` of a build, from ``"i/n"`` or ``(i, n)``."""
    if text is None or isinstance(text, tuple):
        return text
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise GradIndexError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    return i, n


@dataclass(frozen=True)
class QueryOptions:
    """One query's settings. ``k1``/``k2`` default to 1,000 and 100 (never fewer than ``k``, never more than
    the index holds): :meth:`for_index` fills them in."""

    k: int = DEFAULT_K  # results
    k1: int | None = None  # stage-1 (FAISS) candidates
    k2: int | None = None  # distinct texts rescored exactly
    nprobe: int | None = None  # IVF lists searched (IVF indexes only; default: recorded in the index)
    opponents: bool = False  # most negative influence instead of most positive
    cosine: bool = False  # scores divided by both whitened-gradient norms
    per_token: bool = False  # token-wise influence inside each result
    damping: float | None = None  # absolute damping of the exact rerank
    damping_scale: float | None = None  # … or × mean eigenvalue (default: the factors' 0.1)
    candidates: str = "index"  # where the exact rerank's texts come from: "index", "tfidf" or "hybrid"
    distinct: bool = False  # k distinct texts, each listing its copies, instead of k rows

    def __post_init__(self):
        if not _is_count(self.k) or self.k <= 0:
            raise GradIndexError(f"k must be a positive number of results, got {self.k}")
        if self.candidates not in CANDIDATE_SOURCES:
            raise GradIndexError(f"candidates must be one of {', '.join(CANDIDATE_SOURCES)}; got {self.candidates!r}")
        for name in ("k1", "k2"):
            value = getattr(self, name)
            if value is not None and (not _is_count(value) or value <= 0):
                raise GradIndexError(f"{name} must be a positive number of candidates, got {value}")
        if self.nprobe is not None and (not _is_count(self.nprobe) or self.nprobe <= 0):
            raise GradIndexError(f"nprobe must be a positive number of IVF lists, got {self.nprobe}")
        for name in ("damping", "damping_scale"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise GradIndexError(f"{name} must be a positive number, got {value!r}")

    def for_index(self, n_rows: int) -> "QueryOptions":
        """These options against an index of ``n_rows`` rows, defaults filled in."""
        if self.k > n_rows:
            raise GradIndexError(f"k = {self.k} exceeds the {n_rows} sequences in the index")
        k1 = min(n_rows, max(self.k, DEFAULT_K1 if self.k1 is None else self.k1))
        k2 = min(k1, max(self.k, DEFAULT_K2 if self.k2 is None else self.k2))
        return replace(self, k1=k1, k2=k2)

    @classmethod
    def of(cls, options: "QueryOptions | None" = None, k: int | None = None, **overrides) -> "QueryOptions":
        """``options`` (or the defaults) with ``k`` and ``overrides`` applied: what every entry point accepts."""
        for gone in ("rank", "stage2_rank"):
            if gone in overrides:  # gradindex ≤ 0.2: a rank of per-layer codes, which fixed-size codes do not have
                raise GradIndexError(f"{gone}= is gone: indexes now hold one fixed-size code per sequence; widen the "
                                     "exact rerank with k2= instead")
        if k is not None:
            overrides["k"] = k
        return replace(options, **overrides) if options is not None else cls(**overrides)


@dataclass(frozen=True)
class BuildOptions:
    """How an index is built; everything here that decides its content is recorded in ``build.json``."""

    text_field: str = "text"
    split: str | None = None  # a DatasetDict's split (default: train, or the only one)
    max_length: int | None = None  # default: as the factors were fitted, else the model's context
    modules: str = DEFAULT_MODULES  # layers, when the factors are fitted by the build
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    shard_size: int = DEFAULT_SHARD_SIZE  # rows per shard: the unit of resumption
    token_budget: int = DEFAULT_TOKEN_BUDGET  # padded tokens per batch, while fitting and building
    max_memory: int | str = DEFAULT_MAX_MEMORY  # bytes (or "4G") the FAISS index may take: decides exhaustive or IVF
    index_key: str | None = None  # a FAISS factory string overriding that choice
    chunk: bool = True  # documents longer than max_length split into windows (else truncated: the rest is not indexed)
    stride: int | None = None  # tokens between window starts (default: the window length, no overlap)
    chat: bool = False  # text_field holds chat messages, rendered with the tokenizer's chat template

    def __post_init__(self):
        object.__setattr__(self, "max_memory", parse_size(self.max_memory, "memory size"))
        if self.max_memory <= 0:
            raise GradIndexError(f"max memory must be a positive size (e.g. 4G), got {self.max_memory}")
        if not _is_count(self.shard_size) or self.shard_size <= 0:
            raise GradIndexError(f"shard size must be positive, got {self.shard_size}")

    @classmethod
    def of(cls, options: "BuildOptions | None" = None, **overrides) -> "BuildOptions":
        return replace(options, **overrides) if options is not None else cls(**overrides)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: a server shared by a team stays responsive whatever a client sends."""

    max_body: int = 1 << 20  # bytes of a request body
    max_queries: int = 64  # queries in one /query_many
    max_k: int = 100
    max_candidates: int = 10_000  # k1 (stage 1) and k2 (stage 3: a forward+backward each)
    max_per_token_k: int = 20  # results with token-wise scores (each carries every token's score)
    max_text: int = 20_000  # characters of a prompt plus its completion
    max_batch: int = 16  # queries answered by one cascade pass
    max_wait: float = 0.005  # seconds a request waits for others to join its pass

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise GradIndexError(f"{f.name.replace('_', '-')} must be positive, got {getattr(self, f.name)}")
