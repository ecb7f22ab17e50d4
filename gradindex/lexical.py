"""TF-IDF similarity between a query's text and every indexed text: the paper's lexical filter, which
gives the exact rerank a shortlist of its own (``candidates``). Where it is kept is ``store``'s business."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.sparse
from sklearn.feature_extraction.text import TfidfVectorizer

# sublinear tf keeps a word repeated many times from swamping a paragraph.
_PARAMS = {"sublinear_tf": True, "lowercase": True, "dtype": np.float32}


class Lexical:
    """TF-IDF cosine similarity between a query text and every indexed text."""

    def __init__(self, vectorizer: TfidfVectorizer, matrix: scipy.sparse.csr_matrix):
        self.vectorizer = vectorizer
        self.matrix = matrix

    @classmethod
    def fit(cls, texts: Iterable[str], removed: np.ndarray | None = None) -> "Lexical":
        """Fitted on the texts not ``removed`` (their rows stay, all zero: a removed text shapes no weight)."""
        vectorizer = TfidfVectorizer(**_PARAMS)
        if removed is None or len(removed) == 0:
            return cls(vectorizer, vectorizer.fit_transform(texts).tocsr())
        texts = list(texts)
        keep = np.ones(len(texts), dtype=bool)
        keep[removed] = False
        vectorizer.fit([t for t, k in zip(texts, keep) if k])
        matrix = scipy.sparse.diags(keep.astype(np.float32)) @ vectorizer.transform(texts)
        matrix = matrix.tocsr()
        matrix.eliminate_zeros()
        return cls(vectorizer, matrix)

    def similarities(self, texts: list[str]) -> np.ndarray:
        """TF-IDF cosine of each of ``texts`` to every row, (len(texts), rows)."""
        return (self.vectorizer.transform(texts) @ self.matrix.T).toarray()

    def ranking(self, text: str) -> np.ndarray:
        """Every row, most similar to ``text`` first (ties by row)."""
        scores = self.similarities([text])[0]
        return np.lexsort((np.arange(len(scores)), -scores))

    def save(self, directory: Path) -> None:
        """The vocabulary (JSON), the idf weights and the L2-normalised document matrix, into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        vocabulary = {word: int(i) for word, i in self.vectorizer.vocabulary_.items()}
        (directory / "vocabulary.json").write_text(json.dumps(vocabulary))
        np.save(directory / "idf.npy", self.vectorizer.idf_)
        scipy.sparse.save_npz(directory / "matrix.npz", self.matrix)

    @classmethod
    def load(cls, directory: Path) -> "Lexical":
        vocabulary = json.loads((directory / "vocabulary.json").read_text())
        vectorizer = TfidfVectorizer(vocabulary=vocabulary, **_PARAMS)
        vectorizer.idf_ = np.load(directory / "idf.npy")
        return cls(vectorizer, scipy.sparse.load_npz(directory / "matrix.npz").tocsr())
