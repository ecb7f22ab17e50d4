"""The online query: one gradient, a FAISS shortlist, rescoring from stored codes, exact EK-FAC rerank.

    stage 1  FAISS (RaBitQ) over the codes' prefixes            → top k1 candidates
    stage 2  ⟨code_q, code_z⟩ over memory-mapped whole codes     → the k2 best texts (``candidates``)
    stage 3  exact EK-FAC influence of those texts (``scores``) → top k
Opponents (most negative influence) run the same cascade on the negated query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import ann, store
from .reader import ShardReader
from .candidates import Candidates, Shortlist, expected_missed
from .compress import Compressor, QueryEmbedding
from .data import DEFAULT_TOKEN_BUDGET, Query, TokenizedSet, as_queries, tokenize_queries
from .errors import GradIndexError
from .factors import Factors
from .model import LanguageModel, load_model
from .options import QueryOptions
from .capture import device_and_dtype
from .results import Hit, QueryResult, Trace
from .scores import ScoreResult, query_chunks, query_gradients, score_preconditioned


SCORE_CHUNK = 1024  # rows scored per pass of ``all_scores``
MISS_PROBE = 1024  # live rows, drawn once per opened index, whose stage-2 scores stand for those stage 1 did not return


class GradIndex:
    """A built index, opened for queries: ``GradIndex.open(path).query(prompt, completion, k=10)``."""

    def __init__(self, root: Path, manifest: store.Manifest, lm: LanguageModel, factors: Factors, faiss_index,
                 token_budget: int = DEFAULT_TOKEN_BUDGET):
        self.root, self.manifest, self.lm, self.factors = Path(root), manifest, lm, factors
        self.faiss_index = faiss_index
        self.token_budget = token_budget
        self.compressor = Compressor(factors, manifest.compression)
        self.reader = ShardReader(root, manifest.shards, manifest.compression.stage1_dim, removed=store.read_removed(root, manifest))
        self.candidates = Candidates(self.reader, manifest.content_fingerprint, manifest.generation)
        self._live_only = ann.excluding(self.reader.removed)  # removed rows never leave stage 1
        self.n = manifest.n_live
        self.max_query_length = lm.max_length(None)
        # Drawn from all row ids, removed ones dropped: no array of every live row at 10⁸ rows.
        drawn = np.random.default_rng(0).choice(self.reader.n_rows, min(self.reader.n_rows, MISS_PROBE + len(self.reader.removed)), replace=False)
        self.miss_probe = np.sort(drawn[~self.reader.is_removed(drawn)][:MISS_PROBE])

    @classmethod
    def open(cls, path: str | Path, *, model=None, tokenizer=None, dtype: str | None = None, device: str = "cpu",
             token_budget: int = DEFAULT_TOKEN_BUDGET) -> "GradIndex":
        """Open an index; the model defaults to the one it was built from and must have the same weights."""
        root = Path(path)
        manifest = store.load_manifest(root)
        store.check_sizes(root, manifest)
        store.check_hashes(root, [*manifest.factors_files, manifest.index.file])  # what is read whole on open; shards on first read
        lm = load_model(model or store.model_source(root, manifest.build), tokenizer or manifest.build.tokenizer or None, dtype=dtype, device=device)
        if lm.model_hash != manifest.build.model_hash:
            raise GradIndexError(f"index {root} was built for another model (weights hash differs from {manifest.build.model!r})")
        if lm.tokenizer_hash != manifest.build.tokenizer_hash:
            raise GradIndexError(f"index {root} was built with another tokenizer (tokenizer hash differs)")
        factors = Factors.load(root / store.FACTORS_DIR)
        if factors.config.model_hash != manifest.build.model_hash:
            raise GradIndexError(f"index {root}: its factors belong to another model than its vectors")
        faiss_index = store.read_faiss(root, manifest, use_gpu=ann.gpu_available() and str(device).startswith("cuda"), mmap=True)
        return cls(root, manifest, lm, factors, faiss_index, token_budget)

    def training_set(self, rows: Sequence[int]) -> TokenizedSet:
        """The stored token ids of the given rows, scored as training text (every token but the first)."""
        return TokenizedSet.training_text(self.reader.token_ids(rows), self.lm.pad_id)

    def stage1_scores(self, rows: Sequence[int], vectors: np.ndarray) -> np.ndarray:
        """Stage-1 inner products of stored rows with stage-1 query vectors: (dim,) → (rows,), (dim, Q) → (rows, Q)."""
        return self.reader.vectors(rows).astype(np.float32) @ vectors.astype(np.float32)

    def rescore(self, p, data: TokenizedSet, **breakdowns) -> ScoreResult:
        """Exact influence of the sequences of ``data`` given preconditioned query gradients P_q."""
        return score_preconditioned(self.lm.model, self.factors.specs, p, data, token_budget=self.token_budget, progress=False, **breakdowns)

    def all_scores(self, queries: Sequence[Query], *, rows: Sequence[int] | None = None, exact: bool = True,
                   damping: float | None = None, damping_scale: float | None = None, progress: bool = False) -> np.ndarray:
        """Influence of every indexed row (or of ``rows``) on each query, (Q, N or len(rows)) float32; N counts
        every row id, and a removed row's column is NaN.

        ``exact``: brute-force EK-FAC scores (as slow as scoring those rows' training text once). Otherwise
        the stage-1 estimate from the stored vectors: fast, but sketched and at the heavier stage-1
        damping, which flattens the distribution (README: sparsity).
        """
        tokenized = tokenize_queries(self.lm.tokenizer, as_queries(queries), self.max_query_length)
        if rows is None:
            out, live = np.full((len(tokenized), self.reader.n_rows), np.nan, np.float32), self.reader.live_rows()
            out[:, live] = self.all_scores(queries, rows=live, exact=exact, damping=damping, damping_scale=damping_scale, progress=progress)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(tokenized), len(rows)), np.float32)
        if exact:
            p = query_gradients(self.lm.model, self.factors, tokenized, token_budget=self.token_budget, damping=damping,
                                damping_scale=damping_scale)
        else:
            vectors = self.compressor.embed(self.lm.model, tokenized, self.token_budget).vectors
        starts = range(0, len(rows), SCORE_CHUNK)
        for start in tqdm(starts, desc="exact scores" if exact else "stage-1 scores", unit="chunk", disable=not progress):
            chunk = rows[start : start + SCORE_CHUNK]
            if exact:
                out[:, start : start + len(chunk)] = self.rescore(p, self.training_set(chunk)).scores
            else:
                out[:, start : start + len(chunk)] = self.stage1_scores(chunk, vectors.T).T
        return out

    def query(self, prompt: str, completion: str, k: int | None = None, *, options: QueryOptions | None = None, trace: bool = False,
              **overrides) -> QueryResult:
        """Top-k training sequences by EK-FAC influence on log p(completion | prompt); see :meth:`query_many`."""
        return self.query_many([Query(prompt, completion)], k, options=options, trace=trace, **overrides)[0]

    def query_many(self, queries: Sequence[Query] | str | Path, k: int | None = None, *, options: QueryOptions | None = None,
                   trace: bool = False, **overrides) -> list[QueryResult]:
        """Run the cascade for each query, with ``options`` (see :class:`QueryOptions`) and/or its fields as
        keywords. ``trace``: keep every stage's rows and scores on the results."""
        options = QueryOptions.of(options, k, **overrides).for_index(self.n)
        queries = as_queries(queries)
        results = []
        # Groups whose full query gradients fit QUERY_MEMORY: memory does not grow with the number of queries.
        for group in query_chunks(len(queries), self.factors.specs, device_and_dtype(self.lm.model)[1].itemsize):
            results += self._cascade([queries[i] for i in group], options, trace)
        return results

    def _cascade(self, queries: list[Query], options: QueryOptions, trace: bool) -> list[QueryResult]:
        """One pass for all ``queries``: one capture for their gradients, one FAISS search, one exact rescoring
        of the union of their shortlists. Each query's answer is the one it gets alone; times are per query."""
        n, clock = len(queries), time.perf_counter()
        embedding = self.compressor.embed(self.lm.model, tokenize_queries(self.lm.tokenizer, queries, self.max_query_length),
                                          self.token_budget)
        seconds = {"gradient": (time.perf_counter() - clock) / n}
        clock = time.perf_counter()
        stage1 = self._stage1(embedding, options)
        seconds["stage1"], clock = (time.perf_counter() - clock) / n, time.perf_counter()
        picked = []
        for q, query in enumerate(queries):
            rows1, scores1 = stage1[q]
            scores2 = self._stage2(embedding, q, rows1, options)
            shortlist = self.candidates.shortlist(rows1[np.argsort(-_sign(options) * scores2, kind="stable")], query, options.k2,
                                                  options.candidates)
            picked.append((rows1, scores1, scores2, shortlist, *self._scores_by_row(embedding, q, shortlist, rows1, scores1, scores2, options),
                           self._probe(embedding, q, rows1, options)))
        seconds["stage2"], clock = (time.perf_counter() - clock) / n, time.perf_counter()
        ranked = self._stage3(embedding, [pick[3] for pick in picked], options)
        seconds["stage3"] = (time.perf_counter() - clock) / n
        seconds["total"] = sum(seconds.values())
        results = []
        for query, (rows1, scores1, scores2, shortlist, stage1_of, stage2_of, probe), r in zip(queries, picked, ranked):
            hits = self._hits(r, shortlist, stage1_of, stage2_of, options)
            kept = Trace(rows1, scores1, scores2, r.rows, r.scores, r.rows[r.chosen], r.scores[r.chosen])
            missed, outside = expected_missed(rows1, scores2, r.rows, np.array([stage2_of[row] for row in r.rows.tolist()]), r.scores,
                                              len(hits), _sign(options), *probe)
            results.append(QueryResult(query.prompt, query.completion, options.opponents, hits, dict(seconds), kept if trace else None,
                                       missed, outside))
        return results

    def _probe(self, embedding: QueryEmbedding, q: int, rows1: np.ndarray, options: QueryOptions) -> tuple[np.ndarray, float]:
        """Stage-2 scores of the probe rows stage 1 did not return, and how many unreturned rows each stands for."""
        probe = self.miss_probe[~np.isin(self.miss_probe, rows1)] if len(rows1) < self.n else self.miss_probe[:0]
        if len(probe) == 0:
            return np.empty(0), 0.0
        return self._stage2(embedding, q, probe, options), (self.n - len(rows1)) / len(probe)

    def _stage1(self, embedding: QueryEmbedding, options: QueryOptions) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's k1 FAISS candidates and their stage-1 scores (all queries in one search)."""
        sign = _sign(options)
        scores, rows = ann.search(self.faiss_index, sign * embedding.vectors, options.k1, options.nprobe or self.manifest.index.nprobe,
                                  self._live_only)
        return [(r[r >= 0], sign * s[r >= 0]) for r, s in zip(rows, scores)]

    def _normaliser(self, embedding: QueryEmbedding, q: int, rows: np.ndarray, options: QueryOptions) -> np.ndarray:
        """Cosine scores divide by both whitened-gradient norms; plain ones by 1."""
        if not options.cosine:
            return np.ones(len(rows))
        return np.sqrt(np.maximum(self.reader.self_influence(rows), 1e-300)) * max(embedding.norms[q], 1e-300)

    def _stage2(self, embedding: QueryEmbedding, q: int, rows: np.ndarray, options: QueryOptions) -> np.ndarray:
        """Stage-2 scores of ``rows``: their whole stored codes against the query's."""
        return self.compressor.scores(self.reader.codes(rows), embedding, [q])[0] / self._normaliser(embedding, q, rows, options)

    def _scores_by_row(self, embedding, q, shortlist: Shortlist, rows1, scores1, scores2, options) -> tuple[dict, dict]:
        """Stage-1 and stage-2 scores of every shortlisted row; TF-IDF's picks outside stage 1 are scored here."""
        stage1_of = dict(zip(rows1.tolist(), scores1.tolist()))
        stage2_of = dict(zip(rows1.tolist(), scores2.tolist()))
        unseen = np.array([r for r in shortlist.rows.tolist() if r not in stage2_of], dtype=np.int64)
        if len(unseen):
            stage2_of.update(zip(unseen.tolist(), self._stage2(embedding, q, unseen, options).tolist()))
            stage1_of.update(zip(unseen.tolist(), self.stage1_scores(unseen, embedding.vectors[q]).tolist()))
        return stage1_of, stage2_of

    def _stage3(self, embedding: QueryEmbedding, shortlists: list[Shortlist], options: QueryOptions) -> list["_Ranked"]:
        """Exact scores of every query's shortlisted texts, from one rescoring of their union (a text shortlisted
        by several queries is differentiated once), and each query's final k among its rows."""
        union: dict[tuple, int] = {}
        for shortlist in shortlists:
            for g in shortlist.groups:
                union.setdefault(tuple(shortlist.token_ids[g[0]]), len(union))
        p = {name: self.factors.precondition_rotated(name, g, options.damping, options.damping_scale) for name, g in embedding.rotated.items()}
        exact = self.rescore(p, TokenizedSet.training_text([list(key) for key in union], self.lm.pad_id), per_layer=True,
                             per_token=options.per_token)
        return [self._rank(exact, q, [union[tuple(s.token_ids[g[0]])] for g in s.groups], s, embedding, options)
                for q, s in enumerate(shortlists)]

    def _rank(self, exact: ScoreResult, q: int, texts: list[int], shortlist: Shortlist, embedding: QueryEmbedding,
              options: QueryOptions) -> "_Ranked":
        """Query q's final k among its shortlisted rows; ``texts[g]`` is group g's column of ``exact``."""
        text_scores = exact.scores[q, texts].astype(np.float64) / self._normaliser(embedding, q, shortlist.representatives, options)
        members = [(i, g) for g, positions in enumerate(shortlist.groups) for i in positions]  # rows grouped by text
        rows = shortlist.rows[[i for i, _ in members]]
        groups = np.array([g for _, g in members], dtype=np.int64)
        scores = text_scores[groups]
        chosen = np.lexsort((rows, -_sign(options) * scores))
        if options.distinct:  # a text's first row stands for it; the others are listed as its copies
            chosen = chosen[np.sort(np.unique(groups[chosen], return_index=True)[1])]
        per_layer = {name: v[q, texts] for name, v in exact.per_layer.items()}
        per_token = [exact.per_token[t][q] for t in texts] if options.per_token else None
        return _Ranked(text_scores, per_layer, per_token, rows, groups, scores, chosen[: options.k])

    def _hits(self, ranked: "_Ranked", shortlist: Shortlist, stage1_of: dict, stage2_of: dict, options: QueryOptions) -> list[Hit]:
        """The final hits; a text's exact numbers (and stage-2 estimate) come from its representative."""
        rows = ranked.rows[ranked.chosen].tolist()
        meta = self.reader.rows(rows, ("text", "source", "offset", "start", "input_ids"))
        representatives = shortlist.representatives.tolist()
        hits = []
        for i, (row, g) in enumerate(zip(rows, ranked.groups[ranked.chosen].tolist())):
            copies = sorted(int(shortlist.rows[m]) for m in shortlist.groups[g] if int(shortlist.rows[m]) != row)
            hits.append(Hit(
                row=int(row), score=float(ranked.text_scores[g]), approx_score=float(stage2_of[representatives[g]]),
                stage1_score=float(stage1_of[int(row)]), text=meta["text"][i], source=meta["source"][i], offset=meta["offset"][i], start=meta["start"][i],
                per_layer={name: float(v[g]) for name, v in ranked.per_layer.items()},
                tokens=self.lm.tokenizer.convert_ids_to_tokens(meta["input_ids"][i]) if options.per_token else None,
                token_scores=ranked.per_token[g].tolist() if options.per_token else None,
                copies=copies if options.distinct else [],
            ))
        return hits


@dataclass
class _Ranked:
    """Stage 3's outcome: exact results per shortlisted text, and every shortlisted row with its text's score."""

    text_scores: np.ndarray  # per shortlisted text, normalised as the query asks
    per_layer: dict[str, np.ndarray]  # per text
    per_token: list[np.ndarray] | None  # per text
    rows: np.ndarray  # shortlisted rows, grouped by text
    groups: np.ndarray  # each row's text
    scores: np.ndarray  # each row's score (its text's)
    chosen: np.ndarray  # positions in ``rows`` of the final k, best first


def _sign(options: QueryOptions) -> float:
    return -1.0 if options.opponents else 1.0
