"""The online query: one gradient, a FAISS shortlist, low-rank rescoring, exact EK-FAC rerank.

    stage 1  FAISS inner product over stage-1 vectors         → top k1 candidates
    stage 2  Σ_layers ⟨W(G_q), U Vᵀ⟩ from memory-mapped factors → top k2 of those
    stage 3  exact EK-FAC influence of the k2 (as ``scores``)  → top k
Opponents (most negative influence) run the same cascade on the negated query. The k2 rescored can
instead come from TF-IDF similarity to the query text, or half from each (``candidates="hybrid"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from . import ann
from .compress import CompressionConfig, Compressor
from .data import DEFAULT_TOKEN_BUDGET, Query, TokenizedSet, load_queries, tokenize_queries
from .errors import GradIndexError
from .factors import Factors
from .lexical import LEXICAL_DIR, Lexical
from .model import model_fingerprint, resolve_max_length, tokenizer_fingerprint
from .scores import query_gradients, score_preconditioned, sequence_gradients
from .store import FACTORS_DIR, INDEX_FILE, check_sizes, load_manifest, shard_path, shard_texts

DEFAULT_K1 = 1000
DEFAULT_K2 = 100
CANDIDATE_SOURCES = ("index", "tfidf", "hybrid")


@dataclass
class Hit:
    """One training sequence in a query's answer."""

    row: int  # global row id in the index (= offset in the training data)
    score: float  # exact EK-FAC influence (cosine-normalised with ``cosine=True``)
    approx_score: float  # stage-2 low-rank estimate, same normalisation
    stage1_score: float  # the stage-1 inner product (heavier damping: comparable within a query only)
    text: str
    source: str
    offset: int
    per_layer: dict[str, float]
    tokens: list[str] | None = None
    token_scores: list[float] | None = None  # sum to ``score`` (unnormalised) over the sequence's tokens
    copies: list[int] = field(default_factory=list)  # with ``distinct=True``: other rows holding the same text


@dataclass
class Trace:
    """Every stage's candidates and scores, for ``eval``."""

    stage1_rows: np.ndarray  # in FAISS order
    stage1_scores: np.ndarray
    stage2_scores: np.ndarray  # of every stage-1 candidate
    stage2_rows: np.ndarray  # the rows of the k2 texts rescored exactly
    stage2_exact: np.ndarray  # their exact scores (copies share their text's)
    exact_rows: np.ndarray  # the final k
    exact_scores: np.ndarray


@dataclass
class QueryResult:
    prompt: str
    completion: str
    opponents: bool
    hits: list[Hit]
    seconds: dict[str, float] = field(default_factory=dict)
    trace: Trace | None = None


class GradIndex:
    """A built index, opened for queries: ``GradIndex.open(path).query(prompt, completion, k=10)``."""

    def __init__(self, root: Path, manifest: dict, model, tokenizer, factors: Factors, index, token_budget: int):
        self.root = root
        self.manifest = manifest
        self.model = model
        self.tokenizer = tokenizer
        self.factors = factors
        self.index = index
        self.token_budget = token_budget
        self.compressor = Compressor(factors, CompressionConfig(**manifest["compression"]))
        self.n = int(manifest["n_rows"])
        self.shard_size = int(manifest["shard_size"])
        n_shards = len(manifest["shards"])
        self._lowrank = [np.load(shard_path(root, j, "lowrank"), mmap_mode="r") for j in range(n_shards)]
        self._meta: dict[int, object] = {}
        self._lexical: Lexical | None = None
        self._vectors: list[np.ndarray] | None = None
        self.max_query_length = resolve_max_length(model, None)

    @classmethod
    def open(cls, path: str | Path, *, model=None, tokenizer=None, dtype: str | None = None, device: str = "cpu",
             token_budget: int = DEFAULT_TOKEN_BUDGET) -> "GradIndex":
        """Open an index; the model defaults to the one it was built from and must have the same weights."""
        from .pipeline import model_and_tokenizer

        root = Path(path)
        manifest = load_manifest(root)
        check_sizes(root, manifest)
        model, tokenizer, _ = model_and_tokenizer(model or manifest["model"], tokenizer, dtype, device)
        if model_fingerprint(model) != manifest["model_hash"]:
            raise GradIndexError(f"index {root} was built for another model (weights hash differs from {manifest['model']!r})")
        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer_hash"]:
            raise GradIndexError(f"index {root} was built with another tokenizer (tokenizer hash differs)")
        factors = Factors.load(root / FACTORS_DIR)
        if factors.config.model_hash != manifest["model_hash"]:
            raise GradIndexError(f"index {root}: its factors belong to another model than its vectors")
        index = ann.load_index(root / INDEX_FILE, use_gpu=ann.gpu_available() and str(device).startswith("cuda"))
        if index.ntotal != manifest["n_rows"] or index.d != manifest["vector_dim"]:
            raise GradIndexError(f"index {root}: {INDEX_FILE} holds {index.ntotal}×{index.d} vectors, the manifest says "
                                 f"{manifest['n_rows']}×{manifest['vector_dim']}")
        return cls(root, manifest, model, tokenizer, factors, index, token_budget)

    # -- metadata ---------------------------------------------------------------------------------

    def _shard_meta(self, j: int):
        if j not in self._meta:
            try:
                table = pq.read_table(shard_path(self.root, j, "meta"), memory_map=True)
            except Exception as e:
                raise GradIndexError(f"cannot read metadata shard {j} of {self.root}: {e}") from None
            expected = np.arange(j * self.shard_size, j * self.shard_size + table.num_rows)
            if not np.array_equal(table.column("row_id").to_numpy(), expected):
                raise GradIndexError(f"metadata shard {j} of {self.root} does not hold rows {expected[0]}–{expected[-1]}")
            self._meta[j] = table
        return self._meta[j]

    def rows(self, rows: Sequence[int], columns: Sequence[str] = ("text", "source", "offset")) -> dict[str, list]:
        """Metadata columns of the given global rows, in the given order."""
        out: dict[str, list] = {c: [None] * len(rows) for c in columns}
        rows = np.asarray(rows, dtype=np.int64)
        for j in np.unique(rows // self.shard_size):
            where = np.nonzero(rows // self.shard_size == j)[0]
            table = self._shard_meta(int(j)).take(rows[where] - j * self.shard_size)
            for c in columns:
                values = table.column(c).to_pylist()
                for w, v in zip(where, values):
                    out[c][w] = v
        return out

    def tokenized(self, rows: Sequence[int]) -> TokenizedSet:
        """The stored token ids of the given rows, scored as training text (every token but the first)."""
        return _training_set(self.rows(rows, ("input_ids",))["input_ids"])

    def self_influence(self, rows: Sequence[int]) -> np.ndarray:
        return np.asarray(self.rows(rows, ("self_influence",))["self_influence"], dtype=np.float64)

    def outliers(self, n: int = 20, *, exact: bool = False, damping: float | None = None,
                 damping_scale: float | None = None) -> list[tuple[int, float, str]]:
        """The ``n`` sequences of highest self-influence I(z, z) = |W(G_z)|², from the values stored at build
        time (stage-2 damping); ``exact`` recomputes them with the given damping, as ``scores`` would."""
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.n:
            raise GradIndexError(f"n must be between 1 and the {self.n} sequences in the index, got {n}")
        stored = np.concatenate([self._shard_meta(j).column("self_influence").to_numpy() for j in range(len(self._lowrank))])
        rows = np.argsort(-stored, kind="stable")[:n]
        values = stored[rows]
        if exact:
            data = self.tokenized(rows)
            p = query_gradients(self.model, self.factors, data, pad_id=self.tokenizer.pad_token_id, token_budget=self.token_budget,
                                damping=damping, damping_scale=damping_scale)
            scores = score_preconditioned(self.model, self.factors.specs, p, data, pad_id=self.tokenizer.pad_token_id,
                                          token_budget=self.token_budget, progress=False).scores
            values = np.diag(scores).astype(np.float64)
            order = np.argsort(-values, kind="stable")
            rows, values = rows[order], values[order]
        texts = self.rows(rows, ("text",))["text"]
        return [(int(r), float(v), t) for r, v, t in zip(rows, values, texts)]

    def lowrank(self, rows: np.ndarray, rank: int | None = None) -> torch.Tensor:
        """Stage-2 factors of the given rows at ``rank`` (≤ the built rank), read from the memory-mapped
        shards: only those rows, and only the prefix of each that the rank needs."""
        width = self.compressor.component_dim * min(rank or self.compressor.config.rank, self.compressor.config.rank)
        return torch.from_numpy(self._read(self._lowrank, rows, width))

    def stage1_scores(self, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Stage-1 inner products of stored rows with stage-1 query vectors: (dim,) → (rows,), (dim, Q) → (rows, Q)."""
        if self._vectors is None:
            self._vectors = [np.load(shard_path(self.root, j, "vectors"), mmap_mode="r") for j in range(len(self._lowrank))]
        return self._read(self._vectors, rows, None).astype(np.float32) @ vectors.astype(np.float32)

    def _read(self, arrays: list[np.ndarray], rows: np.ndarray, width: int | None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        width = width or arrays[0].shape[1]
        out = np.empty((len(rows), width), dtype=arrays[0].dtype)
        shard = rows // self.shard_size
        for j in np.unique(shard):
            where = np.nonzero(shard == j)[0]
            local = rows[where] - j * self.shard_size
            order = np.argsort(local)  # ascending reads are kinder to the page cache
            out[where[order]] = arrays[j][local[order], :width]
        return out

    def lexical(self) -> Lexical:
        """The TF-IDF of every indexed text (written at build time; rebuilt from the metadata if missing)."""
        if self._lexical is None:
            self._lexical = Lexical.load_or_fit(self.root / LEXICAL_DIR, self.manifest["tokens_fingerprint"],
                                                lambda: shard_texts(self.root, len(self._lowrank)))
        return self._lexical

    def shortlist(self, by_stage2: np.ndarray, query: Query, k2: int, source: str = "index") -> tuple[np.ndarray, list, list[list[int]]]:
        """The k2 distinct texts to rescore exactly: the index's best by stage-2 score (``by_stage2``, best
        first), the most TF-IDF-similar to the query's text, or the index's best half then TF-IDF's.

        Returns every kept row (copies of a kept text included), their token ids, and the rows grouped by
        text (positions into the rows, first = the one rescored): copies share one gradient, so k2 counts texts.
        """
        if source not in CANDIDATE_SOURCES:
            raise GradIndexError(f"candidates must be one of {', '.join(CANDIDATE_SOURCES)}; got {source!r}")
        rows: list[int] = []
        seen: set[int] = set()
        ids: list = []
        groups: list[list[int]] = []
        group_of: dict[tuple, int] = {}

        def take(ranked: np.ndarray, limit: int, chunk: int) -> None:
            for start in range(0, len(ranked), chunk):
                part = ranked[start : start + chunk]
                for row, seq in zip(part.tolist(), self.rows(part, ("input_ids",))["input_ids"]):
                    key = tuple(seq)
                    if key not in group_of:
                        if len(groups) >= limit:
                            continue
                        group_of[key] = len(groups)
                        groups.append([])
                    elif row in seen:
                        continue
                    groups[group_of[key]].append(len(rows))
                    rows.append(row)
                    seen.add(row)
                    ids.append(seq)
                if len(groups) >= limit:
                    return

        if source != "tfidf":
            take(by_stage2, k2 if source == "index" else (k2 + 1) // 2, max(1, len(by_stage2)))
        if source != "index" and len(groups) < k2:
            take(self.lexical().ranking(f"{query.prompt}{query.completion}"), k2, 1024)
        return np.asarray(rows, dtype=np.int64), ids, groups

    def all_scores(self, queries: Sequence[Query], *, rows: Sequence[int] | None = None, exact: bool = True,
                   damping: float | None = None, damping_scale: float | None = None, progress: bool = False) -> np.ndarray:
        """Influence of every indexed row (or of ``rows``) on each query, (Q, N or len(rows)) float32.

        ``exact``: brute-force EK-FAC scores (as slow as scoring those rows' training text once). Otherwise
        the stage-1 estimate from the stored vectors: fast, but sketched and at the heavier stage-1
        damping, which flattens the distribution (README: sparsity).
        """
        tokenized = tokenize_queries(self.tokenizer, list(queries), self.max_query_length)
        pad = self.tokenizer.pad_token_id
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(tokenized), len(rows)), np.float32)
        if exact:
            p = query_gradients(self.model, self.factors, tokenized, pad_id=pad, token_budget=self.token_budget,
                                damping=damping, damping_scale=damping_scale)
        else:
            grads = sequence_gradients(self.model, self.factors.specs, tokenized, pad_id=pad, token_budget=self.token_budget)
            vectors = self.compressor.query_vectors({n: self.factors.rotate(n, g).float() for n, g in grads.items()})[0]
            vectors = vectors.cpu().numpy().astype(np.float32)
        starts = range(0, len(rows), self.shard_size)
        for start in tqdm(starts, desc="exact scores" if exact else "stage-1 scores", unit="shard", disable=not progress):
            chunk = rows[start : start + self.shard_size]
            if exact:
                out[:, start : start + len(chunk)] = score_preconditioned(
                    self.model, self.factors.specs, p, self.tokenized(chunk), pad_id=pad, token_budget=self.token_budget, progress=False
                ).scores
            else:
                out[:, start : start + len(chunk)] = self.stage1_scores(chunk, vectors.T).T
        return out

    # -- querying ---------------------------------------------------------------------------------

    def query(self, prompt: str, completion: str, k: int = 10, **options) -> QueryResult:
        """Top-k training sequences by EK-FAC influence on log p(completion | prompt); see :meth:`query_many`."""
        return self.query_many([Query(prompt, completion)], k=k, **options)[0]

    def query_many(
        self,
        queries: Sequence[Query] | str | Path,
        k: int = 10,
        *,
        k1: int | None = None,
        k2: int | None = None,
        opponents: bool = False,
        cosine: bool = False,
        per_token: bool = False,
        damping: float | None = None,
        damping_scale: float | None = None,
        nprobe: int | None = None,
        rank: int | None = None,
        candidates: str = "index",
        distinct: bool = False,
        trace: bool = False,
    ) -> list[QueryResult]:
        """Run the cascade for each query. ``opponents``: most negative influence instead of most positive.

        ``cosine``: scores divided by both sequences' whitened-gradient norms (at the build's stage-2
        damping), which removes the pull of long, high-loss sequences. ``rank``: stage-2 rank (default
        the built one); lower is faster and coarser. ``nprobe``: IVF lists searched (IVF indexes only).
        ``candidates``: where the k2 texts rescored exactly come from: "index" (stage 2), "tfidf" (lexical
        similarity to prompt + completion) or "hybrid" (half each). ``distinct``: k distinct texts, each
        hit listing the rows of its copies (that were among the candidates), instead of k rows.
        """
        if isinstance(queries, (str, Path)):
            queries = load_queries(queries)
        queries = list(queries)
        k1, k2 = self._check_k(k, k1, k2)
        built = self.compressor.config.rank
        if rank is not None and not 1 <= rank <= built:
            raise GradIndexError(f"rank must be between 1 and the index's stage-2 rank {built}, got {rank}")
        if candidates not in CANDIDATE_SOURCES:
            raise GradIndexError(f"candidates must be one of {', '.join(CANDIDATE_SOURCES)}; got {candidates!r}")
        started = time.perf_counter()
        tokenized = tokenize_queries(self.tokenizer, queries, self.max_query_length)
        grads = sequence_gradients(self.model, self.factors.specs, tokenized, pad_id=self.tokenizer.pad_token_id,
                                   token_budget=self.token_budget)
        rotated = {name: self.factors.rotate(name, g).float() for name, g in grads.items()}
        vectors, whitened = self.compressor.query_vectors(rotated)
        sign = -1.0 if opponents else 1.0
        query_norms = torch.sqrt(sum(w.double().square().sum((1, 2)) for w in whitened.values())).numpy()
        gradient_seconds = (time.perf_counter() - started) / len(queries)
        t = time.perf_counter()
        vectors_np = vectors.cpu().numpy()
        s1_scores, s1_rows = ann.search(self.index, sign * vectors_np, k1, nprobe)
        search_seconds = (time.perf_counter() - t) / len(queries)
        results = []
        for q, query in enumerate(queries):
            timings = {"gradient": gradient_seconds, "stage1": search_seconds}
            keep = s1_rows[q] >= 0
            rows1, scores1 = s1_rows[q][keep], sign * s1_scores[q][keep]
            stage1 = dict(zip(rows1.tolist(), scores1.tolist()))
            t = time.perf_counter()
            w_q = {n: w[q : q + 1] for n, w in whitened.items()}

            def normaliser(rows: np.ndarray) -> np.ndarray:
                if not cosine:
                    return np.ones(len(rows))
                return np.sqrt(np.maximum(self.self_influence(rows), 1e-300)) * max(query_norms[q], 1e-300)

            def stage2(rows: np.ndarray) -> np.ndarray:
                return self.compressor.lowrank_scores(self.lowrank(rows, rank), w_q)[0].numpy() / normaliser(rows)

            approx = stage2(rows1)
            kept, ids, groups = self.shortlist(rows1[np.argsort(-sign * approx, kind="stable")], query, k2, candidates)
            reps = kept[[g[0] for g in groups]]
            known = dict(zip(rows1.tolist(), approx.tolist()))
            unseen = np.array([r for r in kept.tolist() if r not in known], dtype=np.int64)  # TF-IDF's own picks
            if len(unseen):
                known.update(zip(unseen.tolist(), stage2(unseen).tolist()))
                stage1.update(zip(unseen.tolist(), self.stage1_scores(unseen, vectors_np[q]).tolist()))
            timings["stage2"] = time.perf_counter() - t
            t = time.perf_counter()
            p = {name: self.factors.precondition(name, g[q : q + 1], damping, damping_scale) for name, g in grads.items()}
            exact = score_preconditioned(self.model, self.factors.specs, p, _training_set([ids[g[0]] for g in groups]),
                                         pad_id=self.tokenizer.pad_token_id, token_budget=self.token_budget, per_layer=True,
                                         per_token=per_token, progress=False)
            rep_scores = exact.scores[0].astype(np.float64) / normaliser(reps)
            members = [(int(kept[i]), gi) for gi, g in enumerate(groups) for i in g]  # (row, group)
            member_rows = np.array([m[0] for m in members])
            member_scores = np.array([rep_scores[gi] for _, gi in members])
            final = np.lexsort((member_rows, -sign * member_scores))
            if distinct:  # a text's first row stands for it; the others are listed as its copies
                first = np.unique([members[f][1] for f in final], return_index=True)[1]
                final = final[np.sort(first)]
            final = final[:k]
            timings["stage3"] = time.perf_counter() - t
            hits = self._hits([members[f] for f in final], exact, rep_scores, [known[r] for r in reps.tolist()], stage1, per_token)
            if distinct:
                for hit, f in zip(hits, final):
                    hit.copies = sorted(int(kept[i]) for i in groups[members[f][1]] if int(kept[i]) != hit.row)
            timings["total"] = sum(timings.values())
            results.append(QueryResult(
                query.prompt, query.completion, opponents, hits, timings,
                Trace(rows1, scores1, approx, member_rows, member_scores, member_rows[final], member_scores[final]) if trace else None,
            ))
        return results

    def _check_k(self, k: int, k1: int | None, k2: int | None) -> tuple[int, int]:
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise GradIndexError(f"k must be a positive number of results, got {k}")
        if k > self.n:
            raise GradIndexError(f"k = {k} exceeds the {self.n} sequences in the index")
        k1 = min(self.n, max(k, DEFAULT_K1 if k1 is None else k1))
        k2 = min(k1, max(k, DEFAULT_K2 if k2 is None else k2))
        if k1 <= 0 or k2 <= 0:
            raise GradIndexError("k1 and k2 must be positive")
        return k1, k2

    def _hits(self, chosen: list[tuple[int, int]], exact, rep_scores, rep_approx, stage1: dict[int, float], per_token) -> list[Hit]:
        """Hits for (row, group) pairs; a group's exact numbers come from its representative."""
        rows = [row for row, _ in chosen]
        meta = self.rows(rows, ("text", "source", "offset", "input_ids"))
        hits = []
        for i, (row, g) in enumerate(chosen):
            tokens = token_scores = None
            if per_token:
                tokens = self.tokenizer.convert_ids_to_tokens(meta["input_ids"][i])
                token_scores = exact.per_token[g][0].tolist()
            hits.append(Hit(
                row=int(row), score=float(rep_scores[g]), approx_score=float(rep_approx[g]), stage1_score=float(stage1[int(row)]),
                text=meta["text"][i], source=meta["source"][i], offset=int(meta["offset"][i]),
                per_layer={name: float(v[0, g]) for name, v in exact.per_layer.items()},
                tokens=tokens, token_scores=token_scores,
            ))
        return hits


def _training_set(ids: Sequence[Sequence[int]]) -> TokenizedSet:
    """Stored token ids as training text: every token but the first is scored."""
    arrays = [np.asarray(x, dtype=np.int64) for x in ids]
    return TokenizedSet(arrays, [np.arange(len(x)) > 0 for x in arrays])
