"""Query batching: rank-r factors of preconditioned query gradients, checked against explicit float64 SVDs."""

import numpy as np
import pytest
import torch

from gradindex.errors import GradIndexError
from gradindex.fitting import fit_factors
from gradindex.layers import select_layers
from gradindex.scores import LowRankQuery, compute_scores, contract, low_rank, query_bytes, query_gradients, sequence_gradients
from tiny import tiny_model


@pytest.fixture(scope="module")
def setup(tiny_sets, tokenizer):
    model = tiny_model("gpt2", width=8, dtype=torch.float64)
    train, queries = tiny_sets
    layers = select_layers(model)
    factors = fit_factors(model, train, layers, token_budget=64, progress=False)
    return model, factors, train, queries, tokenizer.pad_token_id


def test_full_rank_equals_exact_scores_per_layer_and_per_token(setup):
    model, factors, train, queries, pad = setup
    exact = compute_scores(model, factors, train, queries, token_budget=64, per_layer=True, per_token=True, progress=False)
    full_rank = max(min(s.d_out, s.d_in) for s in factors.specs)
    batched = compute_scores(model, factors, train, queries, token_budget=64, per_layer=True, per_token=True,
                             query_rank=full_rank, progress=False)
    np.testing.assert_allclose(batched.scores, exact.scores, rtol=1e-5, atol=1e-7 * np.abs(exact.scores).max())
    for name in exact.per_layer:
        np.testing.assert_allclose(batched.per_layer[name], exact.per_layer[name], rtol=1e-5, atol=1e-7 * np.abs(exact.scores).max())
    for got, want in zip(batched.per_token, exact.per_token):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * np.abs(exact.scores).max())


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_rank_r_scores_equal_the_explicitly_truncated_query_gradient(setup, rank):
    model, factors, train, queries, pad = setup
    p = query_gradients(model, factors, queries, token_budget=64)
    train_grads = sequence_gradients(model, factors.specs, train, token_budget=64)
    expected = np.zeros((len(queries), len(train)))
    for name, x in p.items():
        for q in range(len(queries)):
            u, s, vt = np.linalg.svd(x[q].numpy())
            truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
            expected[q] += np.einsum("oi,noi->n", truncated, train_grads[name].numpy())
    result = compute_scores(model, factors, train, queries, token_budget=64, per_token=True, query_rank=rank, progress=False)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    # per-token scores are stored as float32
    np.testing.assert_allclose([t.sum(-1) for t in result.per_token], result.scores.T, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_both_low_rank_contractions_agree_with_the_rebuilt_matrix():
    g = torch.Generator().manual_seed(0)
    p = LowRankQuery(torch.randn(50, 7, 2, generator=g, dtype=torch.float64), torch.randn(50, 3, 2, generator=g, dtype=torch.float64))
    a = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    d = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    explicit = torch.einsum("qoi,boi->qb", p.full(), torch.einsum("bto,bti->boi", d, a))
    torch.testing.assert_close(contract(p, a, d), explicit)  # many queries: through the rebuilt P
    torch.testing.assert_close(contract(LowRankQuery(p.left[:1], p.right[:1]), a, d), explicit[:1])  # one: through the factors
    torch.testing.assert_close(contract(p, a, d, per_token=True).sum(-1), explicit)


def test_low_rank_holds_less_memory_and_refuses_bad_ranks(setup):
    model, factors, train, queries, pad = setup
    p = query_gradients(model, factors, queries, token_budget=64)
    assert query_bytes(low_rank(p, 1)) < query_bytes(low_rank(p, 2)) < query_bytes(p)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(GradIndexError, match="query rank"):
            low_rank(p, bad)


def test_queries_beyond_the_memory_cap_are_scored_in_groups_with_the_same_numbers(monkeypatch):
    import gradindex.scores as scores_module
    from gradindex.data import tokenize_texts
    from gradindex.fitting import fit_factors
    from gradindex.layers import select_layers
    from tiny import random_texts, tiny_model, word_tokenizer

    model = tiny_model("llama", width=8, dtype=torch.float64)
    tok = word_tokenizer()
    train = tokenize_texts(tok, random_texts(10, seed=4), max_length=16)
    queries = tokenize_texts(tok, random_texts(5, seed=5), max_length=16)
    factors = fit_factors(model, train, select_layers(model), progress=False)
    together = compute_scores(model, factors, train, queries, per_layer=True, per_token=True, progress=False)
    per_query = 2 * 8 * sum(s.d_out * s.d_in for s in factors.specs)
    assert [len(g) for g in scores_module.query_chunks(5, factors.specs, 8, memory=2 * per_query)] == [2, 2, 1]
    monkeypatch.setattr(scores_module, "QUERY_MEMORY", 2 * per_query)  # two queries a group: three passes
    calls = []
    original = scores_module.score_preconditioned
    monkeypatch.setattr(scores_module, "score_preconditioned", lambda *a, **k: calls.append(1) or original(*a, **k))
    apart = compute_scores(model, factors, train, queries, per_layer=True, per_token=True, progress=False)
    assert len(calls) == 3
    np.testing.assert_allclose(apart.scores, together.scores, rtol=1e-6)
    for name in together.per_layer:
        np.testing.assert_allclose(apart.per_layer[name], together.per_layer[name], rtol=1e-6)
    for a, b in zip(apart.per_token, together.per_token):
        np.testing.assert_allclose(a, b, rtol=1e-6)
