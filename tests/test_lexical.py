"""TF-IDF candidates: the similarity itself (by hand), its storage, and the tfidf / hybrid shortlists in queries and eval."""

import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from gradindex.errors import GradIndexError
from gradindex.evaluation import evaluate
from gradindex.lexical import Lexical
from gradindex.store import LEXICAL_DIR, read_lexical, write_lexical
from gradindex.search import GradIndex
from tiny import N

runner = CliRunner()
TEXTS = ["the red fox jumps", "the lazy dog sleeps all day", "red red red wine", "a fox and a dog", "nothing in common here"]


def hand_tfidf(texts, query):
    """sklearn's definition written out: tf = 1 + ln(count), idf = ln((1 + n) / (1 + df)) + 1, rows L2-normalised."""
    tokens = [re.findall(r"(?u)\b\w\w+\b", t.lower()) for t in texts]
    df = Counter(w for ts in tokens for w in set(ts))
    idf = {w: math.log((1 + len(texts)) / (1 + d)) + 1 for w, d in df.items()}

    def vector(ts):
        v = {w: (1 + math.log(c)) * idf[w] for w, c in Counter(ts).items() if w in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    q = vector(re.findall(r"(?u)\b\w\w+\b", query.lower()))
    return np.array([sum(q.get(w, 0.0) * x for w, x in vector(ts).items()) for ts in tokens])


def test_ranking_is_tfidf_cosine_similarity(tmp_path):
    lexical = Lexical.fit(TEXTS)
    for query in ("red fox", "dog sleeps", "wine"):
        expected = hand_tfidf(TEXTS, query)
        ranking = lexical.ranking(query)
        assert ranking.tolist() == np.lexsort((np.arange(len(TEXTS)), -expected.round(6))).tolist()
    write_lexical(tmp_path, lexical, "abc")
    again = read_lexical(tmp_path, "abc")
    assert again.ranking("red fox").tolist() == lexical.ranking("red fox").tolist()
    assert read_lexical(tmp_path, "other build") is None
    assert read_lexical(tmp_path / "missing", "abc") is None


def test_build_writes_the_tfidf_and_a_deleted_one_is_rebuilt(ws, tmp_path):
    assert (ws / "idx" / LEXICAL_DIR / "matrix.npz").exists()
    copy = tmp_path / "idx"
    shutil.copytree(ws / "idx", copy)
    shutil.rmtree(copy / LEXICAL_DIR)
    opened = GradIndex.open(copy)
    texts = [json.loads(line)["text"] for line in (ws / "train.jsonl").read_text().splitlines()]
    assert opened.candidates.lexical().ranking(texts[7])[0] == 7
    assert (copy / LEXICAL_DIR / "matrix.npz").exists()


def first_texts(index, ranked, limit, exclude=()):
    out = []
    for seq in index.reader.rows(list(ranked), ("input_ids",))["input_ids"]:
        if tuple(seq) not in out and tuple(seq) not in exclude:
            out.append(tuple(seq))
    return out[:limit]


def test_tfidf_and_hybrid_rescore_exactly_the_shortlist_they_name(index, exact):
    prompt, completion = "the king of the north", " wrote a book"
    by_tfidf = index.candidates.lexical().ranking(prompt + completion)
    base = index.query(prompt, completion, k=3, k1=30, k2=8, trace=True)
    by_stage2 = base.trace.stage1_rows[np.argsort(-base.trace.stage2_scores, kind="stable")]
    from_index = first_texts(index, by_stage2, 4)
    expected = {"tfidf": set(first_texts(index, by_tfidf, 8)),
                "hybrid": set(from_index) | set(first_texts(index, by_tfidf, 4, exclude=from_index))}
    for source in ("tfidf", "hybrid"):
        result = index.query(prompt, completion, k=3, k1=30, k2=8, candidates=source, trace=True)
        kept = sorted(set(result.trace.shortlist_rows.tolist()))
        assert {tuple(x) for x in index.reader.rows(kept, ("input_ids",))["input_ids"]} == expected[source]
        # The rerank is exact: the hits are the exact top-3 of what was rescored, with exact scores.
        truth = sorted(kept, key=lambda r: -exact[0, r])[:3]
        assert [h.row for h in result.hits] == truth
        np.testing.assert_allclose([h.score for h in result.hits], exact[0, truth], rtol=1e-5)
        assert all(np.isfinite(h.approx_score) and np.isfinite(h.stage1_score) for h in result.hits)


def test_every_source_finds_the_exact_top_k_when_the_budget_covers_everything(index, exact):
    for source in ("index", "tfidf", "hybrid"):
        result = index.query("the king of the north", " wrote a book", k=5, k1=N, k2=N, candidates=source)
        assert [h.row for h in result.hits] == np.argsort(-exact[0])[:5].tolist()


def test_eval_reports_tfidf_and_hybrid_recall_at_the_same_budget(index, ws):
    report = evaluate(index, ws / "queries.jsonl", k=3, k1=N, k2=N, progress=False)
    assert report.proponents.tfidf_recall == report.proponents.hybrid_recall == report.proponents.stage2_recall == 1.0
    small = evaluate(index, ws / "queries.jsonl", k=3, k1=N, k2=5, progress=False)
    assert 0.0 <= small.proponents.tfidf_recall <= 1.0 and 0.0 <= small.opponents.hybrid_recall <= 1.0
    cli = runner.invoke(app, ["eval", str(ws / "idx"), "--queries", str(ws / "queries.jsonl"), "-k", "3", "--k2", "5"])
    assert cli.exit_code == 0 and "in TF-IDF" in cli.output


def test_unknown_candidate_source_is_refused(index, ws):
    with pytest.raises(GradIndexError, match="candidates must be one of"):
        index.query("the king", " wrote", k=2, candidates="bm25")
    cli = runner.invoke(app, ["query", str(ws / "idx"), "--prompt", "the king", "--completion", " wrote", "--candidates", "bm25"])
    assert cli.exit_code != 0 and "candidates must be one of" in cli.output
