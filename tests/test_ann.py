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
    assert ann.choose_key(1000, 512, 2**30) == "HR,RaBitQ"
    assert ann.choose_key(10**7, 2048, 4 * 2**30) == "HR,RaBitQ"  # 264 bytes a row: 2.6 GB
    key = ann.choose_key(10**8, 2048, 4 * 2**30)
    assert key.startswith("HR,IVF") and key.endswith(",RaBitQ")


def test_rabitq_shortlists_hold_the_true_top_and_its_codes_are_a_sixteenth_of_float16():
    """The default stage 1: 1-bit codes of vectors whose energy sits in their first entries (as a code's
    does). After the Hadamard rotation the exact top-10 sits inside a shortlist of 50 (both signs); without
    it, one bit per entry renders those vectors too coarsely and about half of it is lost."""
    import faiss

    rng = np.random.default_rng(0)
    d, n = 256, 5000
    scale = np.geomspace(100, 0.01, d).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32) * scale
    q = rng.standard_normal((8, d)).astype(np.float32) * scale
    found = {}
    for key in ("HR,RaBitQ", "RaBitQ"):
        index = build(key, x)
        found[key] = [len(set(np.argsort(-t)[:10]) & set(r.tolist())) / 10
                      for sign in (1, -1) for r, t in zip(ann.search(index, sign * q, 50)[1], sign * q @ x.T)]
    assert np.mean(found["HR,RaBitQ"]) >= 0.95 and min(found["HR,RaBitQ"]) >= 0.8
    assert np.mean(found["RaBitQ"]) < 0.8
    assert faiss.downcast_index(faiss.downcast_index(build("HR,RaBitQ", x)).index).code_size == d // 8 + 8


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
