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
    """The rows of an index made from documents: row i is document ``documents[i]`` (its row in the data) from
    its token ``starts[i]``, the characters ``spans[i]`` of its text. Texts are cut from the documents when a
    shard needs them (:meth:`texts`), so a corpus is never held in memory twice."""

    documents: np.ndarray
    starts: np.ndarray
    spans: np.ndarray  # (rows, 2) character ranges; end -1: to the end of the text
    empty: int  # documents skipped for holding no text
    split: int  # documents longer than one window, split
    stride: int  # tokens between window starts; 0: documents truncated, not split

    def __len__(self) -> int:
        return len(self.documents)

    def texts(self, documents, span: range) -> list[str]:
        """The texts of rows ``span``, cut from ``documents`` (the data's text column, read for these rows' documents only)."""
        if len(span) == 0:
            return []
        first = int(self.documents[span.start])
        source = documents[first : int(self.documents[span.stop - 1]) + 1]
        return [source[d - first][b : None if e < 0 else e]
                for d, (b, e) in zip(self.documents[span.start : span.stop].tolist(), self.spans[span.start : span.stop].tolist())]


def split_documents(tokenizer, texts, max_length: int, *, chunk: bool = True, stride: int | None = None, batch: int = 1000) -> Rows:
    """Rows of ``texts`` (a sequence: a list, or a ``datasets`` column read a batch at a time): with ``chunk`` a
    document longer than ``max_length`` tokens (special tokens included) becomes windows of that length, one
    every ``stride`` tokens (default: the window length, no overlap), cut at token boundaries by character
    offsets; without, each document is one row, truncated when tokenized."""
    window = max_length - tokenizer.num_special_tokens_to_add()
    if chunk and stride is not None and not 0 < stride <= window:
        raise GradIndexError(f"stride must be between 1 and the window of {window} tokens, got {stride}")
    stride = (stride or window) if chunk else None
    documents, starts, spans, empty, split = [], [], [], 0, 0
    for first in range(0, len(texts), batch):
        chunk_texts = list(texts[first : first + batch])
        for i, text in enumerate(chunk_texts, first):
            if not isinstance(text, str):
                raise GradIndexError(f"training row {i} is {type(text).__name__}, not text")
        offsets = _offsets(tokenizer, chunk_texts) if stride is not None else [None] * len(chunk_texts)
        for i, (text, tokens) in enumerate(zip(chunk_texts, offsets), first):
            if not text.strip():
                empty += 1
                continue
            if tokens is None or len(tokens) <= window:
                documents.append(i), starts.append(0), spans.append((0, -1))
                continue
            split += 1
            for start in _window_starts(len(tokens), window, stride):
                end = min(start + window, len(tokens)) - 1
                documents.append(i), starts.append(start), spans.append((tokens[start][0], tokens[end][1]))
    if not documents and len(texts):
        raise GradIndexError(f"all {len(texts)} rows of the data are empty")
    return Rows(np.asarray(documents, dtype=np.int64), np.asarray(starts, dtype=np.int64),
                np.asarray(spans, dtype=np.int64).reshape(-1, 2), empty, split, stride or 0)


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
