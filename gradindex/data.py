"""Queries and token ids: the query reader, tokenizing training text and queries, and batching by a token budget."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import GradIndexError, first_line

# Padded tokens per batch. On CPU, larger batches lose more to allocating (B, T, vocab) temporaries
# than they gain (measured with benchmarks/bench_kronfluence.py: 2,048 scored 1.4x faster than 8,192).
DEFAULT_TOKEN_BUDGET = 2048

@dataclass(frozen=True)
class Query:
    """A measurement: the log-likelihood of ``completion`` given ``prompt``, over the completion tokens only."""

    prompt: str
    completion: str

    def __post_init__(self):
        for name, value in (("prompt", self.prompt), ("completion", self.completion)):
            if not isinstance(value, str):  # None or 42 would otherwise be scored as the text "None" / "42"
                raise GradIndexError(f"a query's {name} must be text, got {type(value).__name__} {value!r:.40}")


@dataclass
class TokenizedSet:
    """Token ids per sequence and which positions are scored (predicted) in each.

    ``scored[i][t]`` says whether token t of sequence i is a target of the loss: every token but the
    first for training text, the completion tokens for a query. ``pad_id`` fills batches out to one
    width; padding is masked everywhere, so it only has to be a valid id.
    """

    input_ids: list[np.ndarray]
    scored: list[np.ndarray]
    truncated: list[bool] | None = None  # per sequence: cut to the maximum length (training text only)
    pad_id: int = 0

    @classmethod
    def training_text(cls, ids: Sequence[Sequence[int]], pad_id: int = 0, truncated: list[bool] | None = None) -> "TokenizedSet":
        """Token ids of training text: every token but the first is scored."""
        arrays = [np.asarray(x, dtype=np.int64) for x in ids]
        return cls(arrays, [np.arange(len(x)) > 0 for x in arrays], truncated, pad_id)

    def subset(self, rows: Sequence[int]) -> "TokenizedSet":
        rows = list(rows)
        return TokenizedSet([self.input_ids[r] for r in rows], [self.scored[r] for r in rows],
                            None if self.truncated is None else [self.truncated[r] for r in rows], self.pad_id)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated or ())

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for ids, scored in zip(self.input_ids, self.scored):
            h.update(np.int64(len(ids)).tobytes())
            h.update(ids.astype(np.int64).tobytes())
            h.update(np.packbits(scored).tobytes())
        return h.hexdigest()


@dataclass
class Batch:
    """Right-padded token ids. ``labels`` holds the target id at each position, -100 where unscored."""

    rows: list[int]  # positions of these sequences in their TokenizedSet
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T); labels[:, t] is predicted from position t - 1

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.rows, self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def load_queries(path: str | Path) -> list[Query]:
    """Queries from a jsonl file of ``{"prompt": …, "completion": …}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise GradIndexError(f"queries file not found: {path}")
    queries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise GradIndexError(f"queries file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            queries.append(Query(row["prompt"], row["completion"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GradIndexError(f"{path}:{n}: expected a JSON object with 'prompt' and 'completion' ({first_line(e)})") from None
        except GradIndexError as e:  # a prompt or completion that is not text
            raise GradIndexError(f"{path}:{n}: {e}") from None
    if not queries:
        raise GradIndexError(f"queries file {path} holds no query")
    return queries


def as_queries(queries=None, *, prompt: str | None = None, completion: str | None = None) -> list[Query]:
    """The one reader of query input: a list of :class:`Query`, a jsonl file of them, or one prompt and completion."""
    if prompt is not None or completion is not None:
        if queries is not None:
            raise GradIndexError("give either --queries FILE or --prompt and --completion, not both")
        if prompt is None or completion is None:
            raise GradIndexError("--prompt and --completion go together")
        return [Query(prompt, completion)]
    if queries is None:
        raise GradIndexError("give either --queries FILE or --prompt and --completion")
    if isinstance(queries, (str, Path)):
        return load_queries(queries)
    listed = list(queries) if hasattr(queries, "__iter__") and not isinstance(queries, (Query, dict)) else [queries]
    if not all(isinstance(q, Query) for q in listed):
        bad = next(q for q in listed if not isinstance(q, Query))
        raise GradIndexError(f"queries must be a list of Query(prompt, completion) objects or a jsonl file of them, got {type(bad).__name__}")
    queries = listed
    if not queries:
        raise GradIndexError("no queries given (an empty list)")
    return queries


def tokenize_texts(tokenizer, texts: Iterable[str], max_length: int, chunk: int = 1000) -> TokenizedSet:
    """Tokenize training texts, truncating each to ``max_length`` tokens (truncations are counted)."""
    ids_out, truncated, buffer = [], [], []

    def flush():
        for ids in tokenizer(buffer, add_special_tokens=True, verbose=False)["input_ids"]:
            truncated.append(len(ids) > max_length)
            ids_out.append(np.asarray(ids[:max_length], dtype=np.int64))
        buffer.clear()

    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise GradIndexError(f"training row {i} is {type(text).__name__}, not text")
        buffer.append(text)
        if len(buffer) >= chunk:
            flush()
    if buffer:
        flush()
    return TokenizedSet.training_text(ids_out, _pad_id(tokenizer), truncated)


def tokenize_queries(tokenizer, queries: Sequence[Query], max_length: int) -> TokenizedSet:
    """Each query tokenized as the model sees it: prompt + completion as one text, special tokens added once
    by the post-processor, scored the tokens that end inside the completion (character offsets). Tokenized
    apart, an EOS-appending post-processor puts EOS between the two and SentencePiece a scored '▁' before the
    completion that never occurs in context. A slow tokenizer (no offsets) is read in two pieces."""
    ids_out, scored_out = [], []
    for i, q in enumerate(queries):
        if not q.prompt.strip() or not q.completion.strip():
            raise GradIndexError(f"query {i}: empty {'prompt' if not q.prompt.strip() else 'completion'}")
        try:
            encoded = tokenizer(q.prompt + q.completion, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            scored = np.array([end > len(q.prompt) for _, end in encoded["offset_mapping"]], dtype=bool)
        except (NotImplementedError, TypeError, KeyError):
            prompt = tokenizer(q.prompt, add_special_tokens=True)["input_ids"]
            ids = list(prompt) + list(tokenizer(q.completion, add_special_tokens=False)["input_ids"])
            scored = np.arange(len(ids)) >= len(prompt)
        if not scored.any():
            raise GradIndexError(f"query {i}: completion {q.completion!r} tokenizes to nothing")
        if len(ids) > max_length:
            raise GradIndexError(f"query {i} is {len(ids)} tokens, longer than the maximum length {max_length}")
        ids_out.append(np.asarray(ids, dtype=np.int64))
        scored_out.append(scored)
    return TokenizedSet(ids_out, scored_out, pad_id=_pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def plan_batches(data: TokenizedSet, token_budget: int, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Rows grouped into batches of at most ``token_budget`` padded tokens, longest first to waste little padding.

    Empty sequences are left out: they have nothing to score or to add to A, and a fully masked row
    would only risk NaNs in attention.
    """
    rows = range(len(data)) if rows is None else rows
    order = sorted((r for r in rows if len(data.input_ids[r])), key=lambda r: -len(data.input_ids[r]))
    plan, start = [], 0
    while start < len(order):
        count = max(1, token_budget // len(data.input_ids[order[start]]))
        plan.append(order[start : start + count])
        start += count
    return plan


def collate(data: TokenizedSet, rows: Sequence[int]) -> Batch:
    width = max(max(len(data.input_ids[r]) for r in rows), 1)
    input_ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        ids = torch.from_numpy(data.input_ids[r])
        n = len(ids)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.where(torch.from_numpy(data.scored[r]), ids, torch.tensor(-100))
    return Batch(list(rows), input_ids, attention_mask, labels)
