"""Codes against independent computations: explicit rotations of autograd gradients, explicit sketches,
exhaustive searches of the split."""

import numpy as np
import pytest
import torch

from gradindex.codeplan import CodePlan, CompressionConfig, stage1_bytes
from gradindex.compress import Compressor
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
    whitened = {}
    for name, data in (("queries", queries), ("train", train)):
        grads = sequence_gradients(model, factors.specs, data)
        whitened[name] = {n: factors.rotate(n, g) / (factors.layers[n].lam + factors.damping(n)).sqrt() for n, g in grads.items()}
    return model, factors, train, queries, exact, whitened


def everything(factors) -> int:
    """A budget that holds every entry of every layer exactly (float32, stage 1 included)."""
    return 4 * sum(s.d_out * s.d_in for s in factors.specs) + stage1_bytes(16) + 64


def test_a_budget_holding_every_entry_gives_exact_influence(setup):
    model, factors, train, queries, exact, _ = setup
    comp = Compressor(factors, CompressionConfig(budget=everything(factors), stage1_dim=16, block_cost=1e9, dtype="float32"))
    assert comp.code_dim == sum(s.d_out * s.d_in for s in factors.specs)
    codes, norms = comp.encode(model, train, token_budget=64)
    q = comp.embed(model, queries, token_budget=64)
    np.testing.assert_allclose(comp.scores(codes, q), exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    self_influence = np.diag(compute_scores(model, factors, train, train, progress=False).scores)
    np.testing.assert_allclose(norms, self_influence, rtol=1e-4)
    assert comp.plan.captured == pytest.approx(1.0)


def test_codes_equal_an_explicit_computation(setup):
    """Entries taken from the projected block inside the capture (never forming d_out × d_in) = the same entries
    of W = Q_Sᵀ G Q_A / sqrt(Λ+λ) formed from autograd gradients."""
    model, factors, train, queries, _, whitened = setup
    comp = Compressor(factors, CompressionConfig(budget=4 * 30 + stage1_bytes(16), stage1_dim=16, block_cost=0.6, dtype="float32"))
    assert comp.code_dim == 30 and sum(comp.plan.shares.values()) == 30
    assert all(lp.proj_s.shape[1] < s.d_out for s, lp in zip(factors.specs, comp.plan.layers.values()))  # blocks, not layers
    for data, name in ((train, "train"), (queries, "queries")):
        codes = comp.encode(model, data, token_budget=64)[0] if name == "train" else comp.embed(model, data, token_budget=64).codes
        expected = np.zeros_like(codes, dtype=np.float64)
        for spec in factors.specs:
            lp, f = comp.plan.layers[spec.name], factors.layers[spec.name]
            assert torch.equal(lp.proj_s, f.q_s[:, lp.rows].float()) and torch.equal(lp.proj_a, f.q_a[:, lp.cols].float())
            rows, cols = lp.rows.tolist(), lp.cols.tolist()
            block = whitened[name][spec.name][:, rows][:, :, cols].flatten(1).numpy()
            expected[:, lp.slots.numpy()] = block[:, lp.entries.numpy()]
        np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_full_rank_factors_of_whole_layers_give_exact_influence(setup):
    """Factor blocks that are whole layers at full rank: stage 2 (U·S, Vᵀ against the query's full block) is
    the exact influence, and the stored norm the exact self-influence (V is orthonormal)."""
    model, factors, train, queries, exact, _ = setup
    config = CompressionConfig(budget=everything(factors) * 4, block_cost=1e9, dtype="float32", factor_share=0.9, factor_block=64)
    comp = Compressor(factors, config)
    assert all(lp.factor_rank == min(s.d_out, s.d_in) and lp.factor_proj_s.shape[1] == s.d_out and lp.factor_proj_a.shape[1] == s.d_in
               for s, lp in zip(factors.specs, comp.plan.layers.values()))
    assert not comp.entry_weight.any()  # every entry lies inside a factor block: the factors score it
    codes, norms = comp.encode(model, train, token_budget=64)
    q = comp.embed(model, queries, token_budget=64)
    error = np.abs(comp.scores(codes, q) - exact)  # only the factors' 5-bit levels stand between them
    assert error.max() < 0.05 * np.abs(exact).max() and np.corrcoef(comp.scores(codes, q).ravel(), exact.ravel())[0, 1] > 0.999
    self_influence = np.diag(compute_scores(model, factors, train, train, progress=False).scores)
    np.testing.assert_allclose(norms, self_influence, rtol=1e-4)
    np.testing.assert_allclose(q.norms ** 2, np.diag(compute_scores(model, factors, queries, queries, progress=False).scores), rtol=1e-4)


def test_factor_scores_equal_an_explicit_low_rank_of_autograd_gradients(setup):
    """A partial factor block of low rank, computed by hand: the block of W = Q_Sᵀ G Q_A / sqrt(Λ+λ) from autograd
    gradients, numpy's SVD cut to rank r, Σ_r s_r u_rᵀ W_q v_r, plus the stored entries outside the block."""
    model, factors, train, queries, _, whitened = setup
    config = CompressionConfig(budget=4096, block_cost=1e9, dtype="float32", factor_share=0.5, factor_block=3)
    comp = Compressor(factors, config)
    assert comp.stage1_dim == config.stage1_dim <= sum(comp.plan.shares.values())  # stage 1 searches the entries only
    codes, _ = comp.encode(model, train, token_budget=64)
    q = comp.embed(model, queries, token_budget=64)
    expected = np.zeros((len(queries), len(train)))
    for spec in factors.specs:
        lp = comp.plan.layers[spec.name]
        assert lp.factor_rank == 3 and len(lp.factor_rows) == len(lp.factor_cols) == 3
        u_layer = factors.layers[spec.name].lam / (factors.layers[spec.name].lam + factors.damping(spec.name))
        assert set(lp.factor_rows.tolist()) == set(torch.topk(u_layer.sum(1), 3).indices.tolist())  # the rows of most u
        wz = whitened["train"][spec.name].numpy()
        wq = whitened["queries"][spec.name].numpy()
        r_, c_ = lp.factor_rows.numpy(), lp.factor_cols.numpy()
        for z in range(len(train)):
            u, s, vt = np.linalg.svd(wz[z][np.ix_(r_, c_)])
            x, y = u[:, :3].T * np.sqrt(s[:3, None]), vt[:3] * np.sqrt(s[:3, None])  # U·√S, V·√S, a vector per rank …
            x, y = (np.round(v / (np.abs(v).max(1, keepdims=True) / 15)) * (np.abs(v).max(1, keepdims=True) / 15) for v in (x, y))  # … on 31 levels
            expected[:, z] += np.einsum("qij,ri,rj->q", wq[:, r_][:, :, c_], x, y)
        # the code's entries outside the block, exactly
        inside = np.zeros(wz.shape[1:], bool)
        inside[np.ix_(r_, c_)] = True
        pos = (lp.rows[lp.entries // len(lp.cols)] * spec.d_in + lp.cols[lp.entries % len(lp.cols)]).numpy()
        out = ~inside.flatten()[pos]
        assert np.array_equal(out, lp.outside.numpy())
        expected += wq.reshape(len(wq), -1)[:, pos[out]] @ wz.reshape(len(wz), -1)[:, pos[out]].T
    np.testing.assert_allclose(comp.scores(codes, q), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert codes.nbytes / len(train) + stage1_bytes(comp.stage1_dim) <= config.budget


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_packed_factors_are_finite_survive_copies_and_unpack_to_their_levels(dtype):
    from gradindex.compress import pack_factors, unpack_factors

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, 7, generator=gen, dtype=torch.float64), torch.randn(50, 3, 5, generator=gen, dtype=torch.float64) * 1e-3
    x[0] = 0  # a zero vector stays zero
    slots = pack_factors(x, y, dtype)
    assert slots.dtype == np.dtype(dtype) and np.isfinite(slots).all()
    assert slots.shape[1] == 6 + -(-3 * 12 // {"float16": 3, "float32": 6}[dtype])
    copied = slots.astype(np.float64).astype(dtype)  # any cast a copy might make keeps the bits
    assert copied.tobytes() == slots.tobytes()
    ux, uy = unpack_factors(copied, 3, 7, 5)
    for v, u in ((x.numpy(), ux), (y.numpy(), uy)):
        step = np.abs(v).max(-1, keepdims=True) / 15
        assert np.all(np.abs(u - v) <= step / 2 * 1.01 + 1e-12)  # to the nearest of 31 levels of its own scale
    assert not ux[0].any()


def test_exact_entries_are_those_of_largest_variance_over_all_layers(setup):
    factors = setup[1]
    plan = CodePlan.of(factors, CompressionConfig(budget=4 * 50 + stage1_bytes(8), stage1_dim=8, block_cost=1e9, dtype="float32"))
    u = {n: (f.lam / (f.lam + factors.damping(n))).flatten() for n, f in factors.layers.items()}

    def in_layer(n):  # block positions → positions in the whole (d_out, d_in) layer
        lp, d_in = plan.layers[n], factors.layers[n].lam.shape[1]
        return lp.rows[lp.entries // len(lp.cols)] * d_in + lp.cols[lp.entries % len(lp.cols)]

    kept = torch.cat([u[n][in_layer(n)] for n in u])
    slots = torch.cat([plan.layers[n].slots for n in u])
    assert sorted(slots.tolist()) == list(range(50))  # every slot filled once
    assert torch.allclose(kept.sort(descending=True).values, torch.cat(list(u.values())).sort(descending=True).values[:50])
    assert torch.all(kept[slots.argsort()].diff() <= 0)  # largest first: a prefix is the best shorter code
    assert 0 < plan.captured < 1 and plan.shares == {n: len(plan.layers[n].entries) for n in u}


def test_blocks_hold_the_wanted_entries_within_the_cost_cap():
    from gradindex.codeplan import _block

    u = torch.rand(64, 32).double()
    wanted = torch.zeros(64, 32, dtype=torch.bool)
    wanted[[3, 9, 40], :][:, [1, 7]] = True
    wanted[3, 1] = wanted[9, 7] = wanted[40, 1] = True
    rows, cols = _block(u, wanted, cost=10.0)  # affordable: exactly the rows and columns that hold them
    assert rows.tolist() == [3, 9, 40] and cols.tolist() == [1, 7]
    for d_out, d_in, cost in ((1536, 576, 1.0), (64, 33, 0.5), (512, 129, 2.0)):
        rows, cols = _block(torch.rand(d_out, d_in).double(), torch.ones(d_out, d_in, dtype=torch.bool), cost)
        k_out, k_in = len(rows), len(cols)
        assert k_out * d_out + k_in * d_in + k_out * k_in <= cost * d_out * d_in and k_out * k_in > 0


@pytest.mark.parametrize("factor_share", [0.0, 0.5])
def test_code_size_does_not_grow_with_the_model(factor_share):
    """The same budget gives the same code length on a 2-block and an 8-block, wider model (with factors: a
    smaller block per layer on the deeper one)."""
    from gradindex.data import tokenize_texts
    from tiny import random_texts, word_tokenizer

    data = tokenize_texts(word_tokenizer(), random_texts(12, seed=0), max_length=16)
    config = CompressionConfig(budget=4096, stage1_dim=256, factor_share=factor_share)
    dims = []
    for width, layers in ((16, 2), (32, 8)):
        model = tiny_model("llama", width=width, layers=layers)
        comp = Compressor(fit_factors(model, data, select_layers(model), progress=False), config)
        dims.append(comp.code_dim)
        codes, _ = comp.encode(model, data)
        assert codes.nbytes / len(data) + stage1_bytes(comp.stage1_dim) <= config.budget
    assert dims[1] == config.code_dim if not factor_share else config.entry_dim + config.factor_dim // 2 <= dims[1] <= config.code_dim  # no more


def test_bad_compression_settings_are_refused():
    for bad, message in ((dict(factor_share=1.0), "factor share"), (dict(factor_block=0), "factor_block"),
                         (dict(budget=0), "budget must be a positive integer"), (dict(budget=100, stage1_dim=2048), "does not hold"),
                         (dict(dtype="int4"), "storage dtype"), (dict(block_cost=-1.0), "block_cost"),
                         (dict(damping_scale=float("nan")), "damping scale"), (dict(stage1_dim=2.5), "stage1_dim")):
        with pytest.raises(GradIndexError, match=message):
            CompressionConfig(**bad)
    with pytest.raises(GradIndexError, match="does not hold rank-1 factors for 4 layers"):
        CodePlan.of(fit_factors(*_small_model_and_data()), CompressionConfig(budget=600, factor_share=0.01))


def _small_model_and_data():
    from gradindex.data import tokenize_texts
    from tiny import random_texts, word_tokenizer

    model = tiny_model("gpt2", width=8)
    return model, tokenize_texts(word_tokenizer(), random_texts(6, seed=0), max_length=8), select_layers(model)


def test_capture_hands_over_one_layer_at_a_time_during_the_backward_pass(setup):
    """Each layer's output gradient reaches the callback while the backward pass runs (last layer first) and
    is gone by the next layer's: a build never holds every layer's gradients of a batch."""
    import gc
    import weakref

    from gradindex.capture import capture
    from gradindex.data import collate

    model, factors, train = setup[:3]
    seen, alive = [], []

    def on_layer(name, a, delta):
        gc.collect()
        alive.append(sum(ref() is not None for _, ref in seen))
        seen.append((name, weakref.ref(delta)))

    capture(model, factors.specs, collate(train, list(range(8))), on_layer)
    names = [s.name for s in factors.specs]
    assert [n for n, _ in seen] == names[::-1]  # in backward order, one call per layer
    assert max(alive) == 0
