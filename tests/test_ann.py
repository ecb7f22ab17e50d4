"""The FAISS layer against brute-force inner products."""

import numpy as np
import pytest

from gradindex import ann


def vectors(n=600, d=24, seed=0):
    rng = np.random.default_rng(seed)
    # Norms spread over two orders of magnitude, as whitened gradients' are.
    return (rng.standard_normal((n, d)) * rng.lognormal(0, 1, (n, 1))).astype(np.float32)


def build(key, x):
    blocks = lambda: (x[i : i + 100] for i in range(0, len(x), 100))  # noqa: E731
    return ann.build_index(key, x.shape[1], len(x), blocks, lambda rows: x[rows], seed=0)


@pytest.mark.parametrize("key", ["Flat", "SQfp16", "IVF8,Flat"])
def test_search_returns_the_largest_inner_products(key):
    x = vectors()
    q = np.random.default_rng(1).standard_normal((3, x.shape[1])).astype(np.float32)
    index = build(key, x)
    for sign in (1, -1):  # proponents and opponents
        scores, rows = ann.search(index, sign * q, 10, nprobe=8)
        truth = sign * q @ x.T
        for s, r, t in zip(scores, rows, truth):
            np.testing.assert_array_equal(np.sort(r), np.sort(np.argsort(-t)[:10]))
            np.testing.assert_allclose(s, t[r], rtol=2e-3, atol=2e-3 * np.abs(t).max())


def test_index_choice_follows_the_memory_budget():
    assert ann.choose_key(1000, 512, 2**30) == "SQfp16"
    assert ann.choose_key(500_000, 4096, 4 * 2**30) == "SQfp16"
    assert ann.choose_key(10**6, 4096, 4 * 2**30).endswith(",SQ8")
    key = ann.choose_key(10**7, 4096, 4 * 2**30)
    assert key.startswith("IVF") and "PQ" in key and 4096 % int(key.split("PQ")[1]) == 0


def test_nprobe_applies_to_one_search_only():
    """A query's nprobe is passed with the search: the shared index keeps its own, so the next query is unaffected."""
    faiss = ann.faiss_module()
    x = vectors(2000)
    index = build("IVF16,Flat", x)
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = 4
    q = np.random.default_rng(2).standard_normal((5, x.shape[1])).astype(np.float32)
    before = ann.search(index, q, 50)[1]
    narrow = ann.search(index, q, 50, nprobe=1)[1]
    wide = ann.search(index, q, 50, nprobe=16)[1]
    assert ivf.nprobe == 4 and np.array_equal(ann.search(index, q, 50)[1], before)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :50]
    found = [len(set(a) & set(t)) for rows in (narrow, wide) for a, t in zip(rows, truth)]
    assert sum(found[5:]) == 250 and sum(found[:5]) < 250  # all lists probed finds all; one list does not
