"""TF-IDF candidates, the paper's filtering: a lexical shortlist of training texts to rescore exactly,
alone or beside the index's own.

Stored in the index folder as ``lexical/``: the vocabulary (JSON), the idf weights and the L2-normalised
document matrix (``scipy.sparse``), tagged with the index's token fingerprint so a rebuilt index never
reads a stale one. It is derived data: deleted, it is rebuilt from the metadata's texts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import scipy.sparse
from sklearn.feature_extraction.text import TfidfVectorizer

LEXICAL_DIR = "lexical"
# sublinear tf keeps a word repeated many times from swamping a paragraph.
_PARAMS = {"sublinear_tf": True, "lowercase": True, "dtype": np.float32}


class Lexical:
    """TF-IDF cosine similarity between a query text and every indexed text."""

    def __init__(self, vectorizer: TfidfVectorizer, matrix: scipy.sparse.csr_matrix):
        self.vectorizer = vectorizer
        self.matrix = matrix

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "Lexical":
        vectorizer = TfidfVectorizer(**_PARAMS)
        matrix = vectorizer.fit_transform(texts).tocsr()
        return cls(vectorizer, matrix)

    def ranking(self, text: str) -> np.ndarray:
        """Every row, most similar to ``text`` first (ties by row)."""
        scores = (self.matrix @ self.vectorizer.transform([text]).T).toarray().ravel()
        return np.lexsort((np.arange(len(scores)), -scores))

    def save(self, directory: Path, fingerprint: str) -> None:
        """Write to a scratch folder, then rename it into place: a reader never sees half of one."""
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        vocabulary = {word: int(i) for word, i in self.vectorizer.vocabulary_.items()}
        (tmp / "vocabulary.json").write_text(json.dumps(vocabulary))
        np.save(tmp / "idf.npy", self.vectorizer.idf_)
        scipy.sparse.save_npz(tmp / "matrix.npz", self.matrix)
        (tmp / "lexical.json").write_text(json.dumps({"fingerprint": fingerprint, "rows": self.matrix.shape[0]}))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: Path, fingerprint: str) -> "Lexical | None":
        """The stored TF-IDF of the index with this fingerprint, or None if absent or stale."""
        try:
            info = json.loads((directory / "lexical.json").read_text())
            if info["fingerprint"] != fingerprint:
                return None
            vocabulary = json.loads((directory / "vocabulary.json").read_text())
            idf = np.load(directory / "idf.npy")
            matrix = scipy.sparse.load_npz(directory / "matrix.npz").tocsr()
        except (OSError, ValueError, KeyError):
            return None
        vectorizer = TfidfVectorizer(vocabulary=vocabulary, **_PARAMS)
        vectorizer.idf_ = idf
        return cls(vectorizer, matrix)

    @classmethod
    def load_or_fit(cls, directory: Path, fingerprint: str, texts: Callable[[], Iterable[str]]) -> "Lexical":
        """The stored TF-IDF, or one fitted on ``texts()`` and stored (kept in memory only where the folder
        is read-only)."""
        lexical = cls.load(directory, fingerprint)
        if lexical is None:
            lexical = cls.fit(texts())
            try:
                lexical.save(directory, fingerprint)
            except OSError:
                pass
        return lexical
