"""Training documents made index rows: a document longer than the context is split into fixed-length windows
(the paper's unit is a sequence of the model's context, and a truncated document would leave its rest out of
the index while its hit showed the whole text); empty documents are skipped and counted, never rows that
score 0. Each row keeps its document's place in the data and the token where its window starts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GradIndexError


@dataclass
class Rows:
    """The rows of an index made from documents: ``texts[i]`` is row i, from document ``documents[i]`` (its row
    in the data) starting at its token ``starts[i]``."""

    texts: list[str]
    documents: np.ndarray
    starts: np.ndarray
    empty: int  # documents skipped for holding no text
    split: int  # documents longer than one window, split
    stride: int  # tokens between window starts; 0: documents truncated, not split

    def __len__(self) -> int:
        return len(self.texts)


def split_documents(tokenizer, texts, max_length: int, *, chunk: bool = True, stride: int | None = None, batch: int = 1000) -> Rows:
    """Rows of ``texts``: with ``chunk`` a document longer than ``max_length`` tokens (special tokens included)
    becomes windows of that length, one every ``stride`` tokens (default: the window length, no overlap), cut at
    token boundaries by character offsets; without, each document is one row, truncated when tokenized."""
    window = max_length - tokenizer.num_special_tokens_to_add()
    if chunk and stride is not None and not 0 < stride <= window:
        raise GradIndexError(f"stride must be between 1 and the window of {window} tokens, got {stride}")
    stride = (stride or window) if chunk else None
    out, documents, starts, empty, split = [], [], [], 0, 0
    texts = list(texts)
    for first in range(0, len(texts), batch):
        chunk = texts[first : first + batch]
        for i, text in enumerate(chunk, first):
            if not isinstance(text, str):
                raise GradIndexError(f"training row {i} is {type(text).__name__}, not text")
        offsets = _offsets(tokenizer, chunk) if stride is not None else [None] * len(chunk)
        for i, (text, spans) in enumerate(zip(chunk, offsets), first):
            if not text.strip():
                empty += 1
                continue
            if spans is None or len(spans) <= window:
                out.append(text), documents.append(i), starts.append(0)
                continue
            split += 1
            for start in _window_starts(len(spans), window, stride):
                end = min(start + window, len(spans)) - 1
                out.append(text[spans[start][0] : spans[end][1]]), documents.append(i), starts.append(start)
    return Rows(out, np.asarray(documents, dtype=np.int64), np.asarray(starts, dtype=np.int64), empty, split, stride or 0)


def _window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Every ``stride`` tokens until a window reaches the end, so every token is in some window."""
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def _offsets(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        raise GradIndexError(f"{type(tokenizer).__name__} gives no character offsets, which splitting documents needs; "
                             "use a fast tokenizer, or --truncate") from None
