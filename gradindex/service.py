"""One opened index serving many callers: requests read from JSON and checked against limits, requests that
arrive together answered by one cascade pass (``QueryBatcher``), and rows looked up with their copies.

Everything that touches the model or the shards runs under one lock (``Service.lock``): the capture hooks
one model at a time, and a batch gains nothing from a second thread on the same cores.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields

import numpy as np

from .data import Query, tokenize_queries
from .errors import GradIndexError
from .options import Limits, QueryOptions
from .results import QueryResult
from .search import GradIndex

QUERY_FIELDS = tuple(f.name for f in fields(QueryOptions))


def parse_request(body, limits: Limits, many: bool = False) -> tuple[list[Query], QueryOptions]:
    """Queries and options from a ``/query`` (``prompt``, ``completion``) or ``/query_many`` (``queries``) body,
    validated as the CLI validates them, and within ``limits``."""
    if not isinstance(body, dict):
        raise GradIndexError(f"the request body must be a JSON object, got {type(body).__name__}")
    text_fields = ("queries",) if many else ("prompt", "completion")
    unknown = sorted(set(body) - set(text_fields) - set(QUERY_FIELDS) - {"rank", "stage2_rank"})
    if unknown:
        raise GradIndexError(f"unknown field {unknown[0]!r} (allowed: {', '.join(text_fields + QUERY_FIELDS)})")
    if many:
        listed = body.get("queries")
        if not isinstance(listed, list) or not listed:
            raise GradIndexError("'queries' must be a non-empty list of {\"prompt\", \"completion\"} objects")
        if len(listed) > limits.max_queries:
            raise GradIndexError(f"{len(listed)} queries in one request; at most {limits.max_queries}")
        if not all(isinstance(q, dict) and set(q) == {"prompt", "completion"} for q in listed):
            raise GradIndexError("each query must be an object with exactly 'prompt' and 'completion'")
        queries = [Query(q["prompt"], q["completion"]) for q in listed]
    else:
        missing = [name for name in text_fields if name not in body]
        if missing:
            raise GradIndexError(f"missing field {missing[0]!r}")
        queries = [Query(body["prompt"], body["completion"])]
    for q in queries:
        if len(q.prompt) + len(q.completion) > limits.max_text:
            raise GradIndexError(f"a query of {len(q.prompt) + len(q.completion)} characters; at most {limits.max_text}")
    settings = {name: body[name] for name in body if name not in text_fields}
    for name in ("opponents", "cosine", "per_token", "distinct"):
        if name in settings and not isinstance(settings[name], bool):
            raise GradIndexError(f"{name} must be true or false, got {settings[name]!r}")
    options = QueryOptions.of(None, **settings)
    if options.k > limits.max_k:
        raise GradIndexError(f"k = {options.k}; this server returns at most {limits.max_k}")
    if max(options.k1 or 0, options.k2 or 0) > limits.max_candidates:
        raise GradIndexError(f"k1 and k2 are at most {limits.max_candidates} on this server")
    if options.per_token and options.k > limits.max_per_token_k:
        raise GradIndexError(f"per_token with k = {options.k}; at most {limits.max_per_token_k} results with token scores")
    return queries, options


@dataclass
class _Request:
    queries: list[Query]
    options: QueryOptions
    future: Future


class QueryBatcher:
    """Answers requests through one thread: the requests waiting together (up to ``max_batch`` queries, the
    first waiting at most ``max_wait`` for company) that share their options run as one
    ``GradIndex.query_many`` pass, a query asked by several of them once. ``max_batch=1`` answers them one at a time."""

    def __init__(self, index: GradIndex, lock: threading.Lock, max_batch: int, max_wait: float):
        self.index, self.lock, self.max_batch, self.max_wait = index, lock, max_batch, max_wait
        self.passes = self.answered = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gradindex-batcher", daemon=True)
        self._thread.start()

    def query_many(self, queries: list[Query], options: QueryOptions) -> list[QueryResult]:
        """The results of ``queries``, as ``index.query_many`` gives them; blocks until they are answered."""
        request = _Request(queries, options, Future())
        self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, size, deadline = [first], len(first.queries), time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                size += len(nxt.queries)
            by_options: dict[QueryOptions, list[_Request]] = {}
            for request in batch:
                try:  # a bad k or query fails its own request here, not the pass it would have shared
                    with self.lock:  # the tokenizer too is one caller at a time
                        request.options = request.options.for_index(self.index.n)
                        tokenize_queries(self.index.lm.tokenizer, request.queries, self.index.max_query_length)
                except Exception as e:  # noqa: BLE001
                    request.future.set_exception(e)
                    continue
                by_options.setdefault(request.options, []).append(request)
            for options, group in by_options.items():
                self._answer(group, options)

    def _answer(self, group: list[_Request], options: QueryOptions) -> None:
        try:
            unique = list(dict.fromkeys(q for r in group for q in r.queries))  # a query asked twice at once is answered once
            with self.lock:
                answer_of = dict(zip(unique, self.index.query_many(unique, options=options)))
            self.passes += 1
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests, never lost
            if len(group) > 1:  # one bad request must not fail its neighbours: answer each alone
                for request in group:
                    self._answer([request], options)
                return
            group[0].future.set_exception(e)
            return
        for request in group:
            request.future.set_result([answer_of[q] for q in request.queries])
            self.answered += len(request.queries)


class Service:
    """An opened index and its batcher: what the server's endpoints call."""

    def __init__(self, index: GradIndex, limits: Limits = Limits()):
        self.index, self.limits, self.lock = index, limits, threading.Lock()
        self.batcher = QueryBatcher(index, self.lock, limits.max_batch, limits.max_wait)
        self._hashes: tuple[np.ndarray, np.ndarray] | None = None  # sorted text hashes, and their rows

    def query_many(self, body, many: bool = True) -> list[QueryResult]:
        queries, options = parse_request(body, self.limits, many)
        return self.batcher.query_many(queries, options)

    def row(self, row: int) -> dict:
        """A row's whole text, where it came from, and every other live row holding the same text."""
        with self.lock:
            if not 0 <= row < self.index.reader.n_rows or self.index.reader.is_removed([row])[0]:
                raise GradIndexError(f"no row {row} in this index (rows 0–{self.index.reader.n_rows - 1}, removed rows excluded)")
            meta = self.index.reader.rows([row], ("text", "source", "offset", "start", "self_influence"))
            hashes, rows = self._text_hashes()
        key = _text_hash(meta["text"][0])
        lo, hi = np.searchsorted(hashes, key, "left"), np.searchsorted(hashes, key, "right")
        copies = sorted(int(r) for r in rows[lo:hi] if r != row)
        return {"row": row, **{name: values[0] for name, values in meta.items()}, "copies": copies}

    def _text_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live row's text hash, sorted (16 bytes a row, read once on the first lookup)."""
        if self._hashes is None:
            hashes = np.fromiter((_text_hash(t) for t in self.index.reader.texts()), dtype=np.uint64, count=self.index.reader.n_rows)
            live = self.index.reader.live_rows()
            order = np.argsort(hashes[live], kind="stable")
            self._hashes = hashes[live][order], live[order]
        return self._hashes

    def close(self) -> None:
        self.batcher.close()


def _text_hash(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))
