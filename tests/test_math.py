"""Every numerical piece against an independent float64 computation: autograd, explicit sums, explicit inverses."""

import numpy as np
import pytest
import torch

from gradindex.capture import sample_labels, summed_nll
from gradindex.data import TokenizedSet
from gradindex.fitting import fit_factors
from gradindex.layers import select_layers
from gradindex.scores import compute_scores, contract, sequence_gradients


def single(data: TokenizedSet, i: int):
    """Sequence i alone, unpadded, with its labels (-100 where unscored)."""
    ids = torch.from_numpy(data.input_ids[i])[None]
    labels = torch.where(torch.from_numpy(data.scored[i]), ids[0], torch.tensor(-100))[None]
    return ids, labels


def autograd_gradient(model, spec, data, i, labels=None):
    """Per-example parameter gradient of layer ``spec`` in (d_out, d_in) orientation, bias column last."""
    module = dict(model.named_modules())[spec.name]
    ids, own = single(data, i)
    loss = summed_nll(model(input_ids=ids).logits, own if labels is None else labels)
    params = [module.weight] + ([module.bias] if spec.has_bias else [])
    grads = torch.autograd.grad(loss, params)
    w = grads[0].T if spec.transposed else grads[0]
    return torch.cat([w, grads[1][:, None]], 1) if spec.has_bias else w


def token_matrices(model, spec, data, i, labels=None):
    """The layer's inputs (bias column appended) and output gradients for sequence i, via its own hooks."""
    module = dict(model.named_modules())[spec.name]
    kept = {}
    handle = module.register_forward_hook(lambda m, args, out: kept.update(x=args[0], y=out))
    ids, own = single(data, i)
    with torch.enable_grad():
        loss = summed_nll(model(input_ids=ids).logits, own if labels is None else labels)
        (dy,) = torch.autograd.grad(loss, kept["y"])
    handle.remove()
    x = kept["x"].detach().reshape(-1, kept["x"].shape[-1])  # OPT flattens (B, T) before its MLP
    if spec.has_bias:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return x, dy.reshape(-1, dy.shape[-1])


def explicit_fisher(f, damping):
    """The damped EK-FAC curvature as a dense matrix over row-major vec(G): (Q_S ⊗ Q_A) diag(Λ + λ) (Q_S ⊗ Q_A)ᵀ."""
    q = torch.kron(f.q_s.double(), f.q_a.double())
    return q @ torch.diag(f.lam.double().reshape(-1) + damping) @ q.T


def test_sequence_gradients_match_per_example_autograd(model64, tiny_sets, tokenizer):
    train, _ = tiny_sets
    layers = select_layers(model64, "all")
    grads = sequence_gradients(model64, layers, train, token_budget=64)
    for spec in layers:
        for i in (0, 5, 23):
            expected = autograd_gradient(model64, spec, train, i)
            torch.testing.assert_close(grads[spec.name][i], expected, rtol=1e-10, atol=1e-12)


def test_covariances_and_eigenvalue_correction_match_explicit_sums(model64, tiny_sets, tokenizer):
    train, _ = tiny_sets
    layers = select_layers(model64)
    factors = fit_factors(model64, train, layers, fisher="empirical", token_budget=64, progress=False)
    n_tokens = sum(len(x) for x in train.input_ids)
    for spec in layers:
        f = factors.layers[spec.name]
        a_sum, s_sum = 0, 0
        for i in range(len(train)):
            x, dy = token_matrices(model64, spec, train, i)
            a_sum, s_sum = a_sum + x.T @ x, s_sum + dy.T @ dy
        torch.testing.assert_close(f.q_a @ torch.diag(f.a_eigvals) @ f.q_a.T, a_sum / n_tokens, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(f.q_s @ torch.diag(f.s_eigvals) @ f.q_s.T, s_sum / n_tokens, rtol=1e-9, atol=1e-14)
        lam = sum((f.q_s.T @ autograd_gradient(model64, spec, train, i) @ f.q_a) ** 2 for i in range(len(train))) / len(train)
        torch.testing.assert_close(f.lam, lam, rtol=1e-9, atol=1e-14)


def test_true_fisher_uses_labels_sampled_per_sequence_whatever_the_batching(tiny_sets, tokenizer):
    from tiny import tiny_model

    model = tiny_model("gpt2", width=8, dtype=torch.float64)
    train, _ = tiny_sets
    layers = select_layers(model)
    seed = 7
    factors = fit_factors(model, train, layers, seed=seed, token_budget=64, progress=False)
    spec = layers[0]
    s_sum = 0
    for i in range(len(train)):
        ids, own = single(train, i)
        sampled = sample_labels(model(input_ids=ids).logits, own, [seed + i])
        _, dy = token_matrices(model, spec, train, i, labels=sampled)
        s_sum = s_sum + dy.T @ dy
    f = factors.layers[spec.name]
    expected = s_sum / sum(len(x) for x in train.input_ids)
    torch.testing.assert_close(f.q_s @ torch.diag(f.s_eigvals) @ f.q_s.T, expected, rtol=1e-9, atol=1e-14)
    # Same seed, other batching: identical factors. Other seed: other labels, other S.
    again = fit_factors(model, train, layers, seed=seed, token_budget=10_000, progress=False)
    torch.testing.assert_close(again.layers[spec.name].lam, f.lam, rtol=1e-10, atol=1e-14)
    other = fit_factors(model, train, layers, seed=seed + 1, token_budget=64, progress=False)
    assert not torch.allclose(other.layers[spec.name].s_eigvals, f.s_eigvals)


def test_preconditioned_gradient_equals_explicit_damped_kronecker_inverse(model64, tiny_sets, tokenizer):
    train, _ = tiny_sets
    layers = select_layers(model64)
    factors = fit_factors(model64, train, layers, token_budget=64, progress=False)
    for spec in layers:
        f = factors.layers[spec.name]
        damping = factors.damping(spec.name)
        assert damping == pytest.approx(0.1 * f.lam.mean().item())
        g = autograd_gradient(model64, spec, train, 3)
        expected = torch.linalg.solve(explicit_fisher(f, damping), g.reshape(-1)).reshape(g.shape)
        torch.testing.assert_close(factors.precondition(spec.name, g), expected, rtol=1e-8, atol=1e-12)
        # A user-given absolute damping replaces the heuristic.
        expected = torch.linalg.solve(explicit_fisher(f, 0.5), g.reshape(-1)).reshape(g.shape)
        torch.testing.assert_close(factors.precondition(spec.name, g, damping=0.5), expected, rtol=1e-8, atol=1e-12)


def test_scores_equal_explicit_influence_and_decompose(model64, tiny_sets, tokenizer):
    train, queries = tiny_sets
    layers = select_layers(model64)
    factors = fit_factors(model64, train, layers, token_budget=64, progress=False)
    result = compute_scores(model64, factors, train, queries, token_budget=64, per_layer=True, per_token=True, progress=False)
    expected = np.zeros((len(queries), len(train)))
    for spec in layers:
        inverse = torch.linalg.inv(explicit_fisher(factors.layers[spec.name], factors.damping(spec.name)))
        gq = torch.stack([autograd_gradient(model64, spec, queries, q).reshape(-1) for q in range(len(queries))])
        gz = torch.stack([autograd_gradient(model64, spec, train, z).reshape(-1) for z in range(len(train))])
        layer = (gq @ inverse @ gz.T).numpy()
        np.testing.assert_allclose(result.per_layer[spec.name], layer, rtol=1e-5, atol=1e-6 * np.abs(layer).max())
        expected += layer
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    for z, tokens in enumerate(result.per_token):
        assert tokens.shape == (len(queries), len(train.input_ids[z]))
        np.testing.assert_allclose(tokens.sum(1), result.scores[:, z], rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_scores_do_not_depend_on_batching_or_padding(tiny_sets, tokenizer):
    from tiny import tiny_model

    model = tiny_model("llama", width=8, dtype=torch.float64)
    train, queries = tiny_sets
    factors = fit_factors(model, train, select_layers(model), token_budget=64, progress=False)
    alone = compute_scores(model, factors, train, queries, token_budget=1, progress=False).scores
    padded = compute_scores(model, factors, train, queries, token_budget=10_000, progress=False).scores
    np.testing.assert_allclose(alone, padded, rtol=1e-6, atol=1e-9 * np.abs(alone).max())


def test_self_influence_is_positive(model64, tiny_sets, tokenizer):
    train, _ = tiny_sets
    factors = fit_factors(model64, train, select_layers(model64), token_budget=64, progress=False)
    scores = compute_scores(model64, factors, train, train, progress=False).scores
    assert (np.diag(scores) > 0).all()
    # Self-influence is a squared norm in the whitened space: it bounds every pairwise score (Cauchy–Schwarz).
    diag = np.diag(scores)
    assert (np.abs(scores) <= np.sqrt(np.outer(diag, diag)) * (1 + 1e-6)).all()


def test_contraction_orders_agree():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    a = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    d = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    explicit = torch.einsum("qoi,boi->qb", p, torch.einsum("bto,bti->boi", d, a))
    torch.testing.assert_close(contract(p, a, d), explicit)
    torch.testing.assert_close(contract(p[:1], a, d), explicit[:1])
    torch.testing.assert_close(contract(p, a, d, per_token=True).sum(-1), explicit)


def test_sampled_labels_follow_the_model_distribution():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 5.0], [0.0] * 4]])
    labels = torch.tensor([[-100, 1, 2]])
    draws = torch.stack([sample_labels(logits, labels, [seed])[0, 1:] for seed in range(20_000)])
    assert (sample_labels(logits, labels, [0])[0, 0] == -100).all()
    for t in range(2):
        freq = torch.bincount(draws[:, t], minlength=4).double() / len(draws)
        torch.testing.assert_close(freq, torch.softmax(logits[0, t].double(), -1), atol=0.012, rtol=0)
