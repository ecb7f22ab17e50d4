"""The compressions against independent computations: explicit whitened inner products, explicit SVDs."""

import numpy as np
import pytest
import torch

from gradindex.compress import CompressionConfig, Compressor, randomized_svd
from gradindex.errors import GradIndexError
from gradindex.fitting import fit_factors
from gradindex.layers import select_layers
from gradindex.scores import compute_scores, sequence_gradients
from tiny import tiny_model


@pytest.fixture(scope="module")
def setup(tiny_sets, tokenizer):
    model = tiny_model("gpt2", width=8, dtype=torch.float64)
    train, queries = tiny_sets
    factors = fit_factors(model, train, select_layers(model), progress=False)
    exact = compute_scores(model, factors, train, queries, progress=False).scores
    rotated = {}
    for name, data in (("queries", queries), ("train", train)):
        grads = sequence_gradients(model, factors.specs, data)
        rotated[name] = {n: factors.rotate(n, g) for n, g in grads.items()}
    return model, factors, train, queries, exact, rotated


def full_size(factors):
    return max(s.d_out * s.d_in for s in factors.specs)


def stage_scores(setup, config, tokenizer):
    """Stage-1 and stage-2 scores of every (query, training sequence) pair, and self-influence."""
    factors, rotated = setup[1], setup[5]
    comp = Compressor(factors, config)
    vectors, lowrank, self_influence = comp.compress(rotated["train"])
    qv, whitened = comp.query_vectors(rotated["queries"])
    stage1 = (qv @ vectors.T).numpy()
    stage2 = comp.stage2_scores(lowrank, whitened).numpy()
    return stage1, stage2, self_influence.numpy()


def test_builder_stores_what_the_compressor_computes(setup, tokenizer):
    """The batched, padded, float16 build path against per-sequence gradients compressed directly."""
    model, factors, train = setup[:3]
    comp = Compressor(factors, CompressionConfig(stage2_rank=3))
    vectors, lowrank, self_influence = comp.encode(model, train, token_budget=64)
    assert vectors.dtype == lowrank.dtype == np.float16 and vectors.shape == (len(train), comp.vector_dim)
    v, f, s = comp.compress(setup[5]["train"])
    np.testing.assert_allclose(vectors, v.numpy(), rtol=2e-3, atol=2e-3 * float(v.abs().max()))
    np.testing.assert_allclose(self_influence, s.numpy(), rtol=1e-6)
    _, whitened = comp.query_vectors(setup[5]["queries"])
    stored = comp.stage2_scores(torch.from_numpy(lowrank), whitened).numpy()
    direct = comp.stage2_scores(f, whitened).numpy()
    np.testing.assert_allclose(stored, direct, rtol=1e-2, atol=1e-2 * np.abs(direct).max())


def test_all_top_eigenvalue_entries_at_the_exact_damping_give_exact_influence(setup, tokenizer):
    exact = setup[4]
    config = CompressionConfig(stage1="topl", stage1_dim=full_size(setup[1]), stage1_damping_scale=0.1, dtype="float32")
    stage1, _, _ = stage_scores(setup, config, tokenizer)
    np.testing.assert_allclose(stage1, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_full_rank_factors_give_exact_influence_and_self_influence(setup, tokenizer):
    model, factors, train, _, exact, _ = setup
    rank = max(min(s.d_out, s.d_in) for s in factors.specs)
    _, stage2, self_influence = stage_scores(setup, CompressionConfig(stage2_rank=rank, dtype="float32", power_iterations=2), tokenizer)
    np.testing.assert_allclose(stage2, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    own = compute_scores(model, factors, train, train, progress=False).scores
    np.testing.assert_allclose(self_influence, np.diag(own), rtol=1e-4)


def test_count_sketch_is_unbiased(setup, tokenizer):
    """Averaged over sketch seeds, the stage-1 inner product equals influence at the stage-1 damping."""
    config = CompressionConfig(stage1="topl", stage1_dim=full_size(setup[1]), stage1_damping_scale=1.0, dtype="float32")
    target, _, _ = stage_scores(setup, config, tokenizer)
    mean = np.mean([stage_scores(setup, CompressionConfig(stage1_dim=16, seed=s, stage2_rank=1, dtype="float32"), tokenizer)[0] for s in range(40)], 0)
    err = np.abs(mean - target).max() / np.abs(target).max()
    assert err < 0.2, err  # one sketch alone is far off at 16 buckets; 40 average out
    single = stage_scores(setup, CompressionConfig(stage1_dim=16, seed=0, stage2_rank=1, dtype="float32"), tokenizer)[0]
    assert np.abs(single - target).max() / np.abs(target).max() > err


def test_heavier_stage1_damping_changes_scores_but_keeps_sign_structure(setup, tokenizer):
    exact = setup[4]
    config = CompressionConfig(stage1="topl", stage1_dim=full_size(setup[1]), stage1_damping_scale=10.0, dtype="float32")
    stage1, _, _ = stage_scores(setup, config, tokenizer)
    assert not np.allclose(stage1, exact, rtol=1e-2)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(stage1, exact)]
    assert min(corr) > 0.5, corr


def test_randomized_svd_is_the_best_rank_r_approximation_when_exact():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(5, 30, 3, generator=g, dtype=torch.float64) @ torch.randn(5, 3, 12, generator=g, dtype=torch.float64)
    u, v = randomized_svd(low, 3)
    torch.testing.assert_close(u @ v.mT, low)
    wide = torch.randn(4, 7, 40, generator=g, dtype=torch.float64)
    u, v = randomized_svd(wide, 2, power_iterations=6)
    s = torch.linalg.svdvals(wide)
    best = torch.sqrt((s[:, 2:] ** 2).sum(-1))
    torch.testing.assert_close(torch.linalg.matrix_norm(wide - u @ v.mT), best, rtol=1e-3, atol=0)
    u, v = randomized_svd(wide, 10)  # rank above the matrix size: zero-padded to a fixed width
    assert u.shape == (4, 7, 10) and v.shape == (4, 40, 10)
    torch.testing.assert_close(u @ v.mT, wide)


def test_bad_compression_settings_are_refused():
    with pytest.raises(GradIndexError, match="stage-1 scheme"):
        CompressionConfig(stage1="pca")
    with pytest.raises(GradIndexError, match="positive"):
        CompressionConfig(stage2_rank=0)


def test_factor_prefixes_are_the_lower_ranks_and_converge_to_exact(setup, tokenizer):
    """Stored component-major, largest first: a row's prefix is a lower-rank approximation whose
    stage-2 scores approach exact influence as the rank grows."""
    factors, rotated, exact = setup[1], setup[5], setup[4]
    rank = max(min(s.d_out, s.d_in) for s in factors.specs)
    comp = Compressor(factors, CompressionConfig(stage2_rank=rank, dtype="float32", power_iterations=2))
    _, lowrank, _ = comp.compress(rotated["train"])
    _, whitened = comp.query_vectors(rotated["queries"])
    errors = [np.abs(comp.stage2_scores(lowrank[:, : r * comp.component_dim], whitened).numpy() - exact).max() for r in range(1, rank + 1)]
    assert all(a >= b - 1e-3 * np.abs(exact).max() for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 * np.abs(exact).max() and errors[-1] < 1e-4 * np.abs(exact).max()


def splitmix64_reference(layer: str, seed: int, entries, dim: int):
    """The sketch hash written out with Python integers: blake2b key, splitmix64 stream, multiply-shift, low bit."""
    import hashlib

    mask = (1 << 64) - 1
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{layer}".encode(), digest_size=8).digest(), "little")
    out = []
    for i in entries:
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((((z >> 32) * dim) >> 32, 1 if z & 1 else -1))
    return out


def test_sketch_buckets_are_a_fixed_hash_independent_of_torchs_generator(monkeypatch):
    from gradindex.compress import sketch_hash

    entries = [0, 1, 2, 12345, 999_999]
    # Fixed forever for version "splitmix64-v1": an index built today must sketch the same way after any upgrade.
    expected = [(214, -1), (346, 1), (295, 1), (54, 1), (674, -1)]
    assert splitmix64_reference("transformer.h.0.mlp.c_fc", 0, entries, 1024) == expected
    torch.manual_seed(1234)
    torch.rand(1000)  # whatever state the global generator is in …
    monkeypatch.setattr(torch, "randint", lambda *a, **k: pytest.fail("the sketch must not draw from torch's RNG"))
    buckets, signs = sketch_hash("transformer.h.0.mlp.c_fc", 1_000_000, 1024, seed=0, chunk=4096)  # … and however it is chunked
    assert [(int(buckets[i]), int(signs[i])) for i in entries] == expected
    assert buckets.min() >= 0 and buckets.max() == 1023 and abs(float(signs.mean())) < 0.01
    assert torch.bincount(buckets).float().std() < 1.2 * (1_000_000 / 1024) ** 0.5  # as even as random buckets
    other_layer, other_seed = sketch_hash("transformer.h.1.mlp.c_fc", 64, 16), sketch_hash("transformer.h.0.mlp.c_fc", 64, 16, seed=1)
    assert not torch.equal(other_layer[0], sketch_hash("transformer.h.0.mlp.c_fc", 64, 16)[0])
    assert not torch.equal(other_seed[0], sketch_hash("transformer.h.0.mlp.c_fc", 64, 16)[0])


def test_sketch_hash_version_is_recorded_and_an_unknown_one_refused(setup):
    from gradindex.compress import LEGACY_SKETCH_HASH, SKETCH_HASH

    config = CompressionConfig(stage1_dim=16)
    assert config.sketch_hash == SKETCH_HASH == CompressionConfig.from_dict(config.to_dict()).sketch_hash
    old = {k: v for k, v in config.to_dict().items() if k != "sketch_hash"}
    assert CompressionConfig.from_dict(old).sketch_hash == LEGACY_SKETCH_HASH  # written before the hash was recorded
    with pytest.raises(GradIndexError, match="sketch hash 'splitmix64-v9' is unknown to this gradindex"):
        CompressionConfig.from_dict({**config.to_dict(), "sketch_hash": "splitmix64-v9"})
    # Legacy indexes keep their torch-generator buckets, so they still read as they were built.
    factors = setup[1]
    legacy = Compressor(factors, CompressionConfig(stage1_dim=16, sketch_hash=LEGACY_SKETCH_HASH))
    generator = torch.Generator().manual_seed(0)
    first = factors.specs[0]
    assert torch.equal(legacy._select[first.name], torch.randint(0, 16, (first.d_out * first.d_in,), generator=generator))
