"""Fused MoE experts (transformers 5's 3-D expert parameters) as tracked layers, one per expert and projection:
gradients against autograd through the model's own experts kernels, scores against an explicit damped
Kronecker inverse, the default selection against the families' parameter names."""

import numpy as np
import pytest
import torch

from gradindex.data import TokenizedSet
from gradindex.fitting import fit_factors
from gradindex.layers import coverage, select_layers
from gradindex.scores import compute_scores, sequence_gradients
from test_math import explicit_fisher
from tiny import autograd_gradients as _autograd, tiny_family

VOCAB = 50


def _data(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TokenizedSet.training_text([torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                                       for _ in range(n)])


def _experts(specs):
    return [s for s in specs if s.expert is not None]


# Mixtral: gate_up fused, no bias; Qwen2-MoE: a shared expert beside them; GPT-OSS: weights stored transposed, biases,
# interleaved gate/up with its own clamped gate; DeepSeek-V3: a dense first block, shared experts, grouped routing.
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_expert_gradients_equal_autograd_in_float64(family):
    model = tiny_family(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"  # the grouped kernel has no float64; the capture needs none
    specs = _experts(select_layers(model))
    assert specs and {s.projection for s in specs} == {"gate_up_proj", "down_proj"}
    data = _data()
    ours = sequence_gradients(model, specs, data, token_budget=64)  # padded batches
    expected = _autograd(model, data, specs)
    assert sum(bool(g.abs().sum() > 0) for g in expected.values()) == len(specs)  # every expert got tokens
    # DeepSeek-V3's router runs in float32 whatever the model's dtype (F.linear of float32 casts in its modeling
    # file), so its routing weights carry float32 rounding, which depends on the batch's shape (padded here, one
    # sequence in autograd): measured 1.3e-6 relative on one CPU, 0 on another. Everything else is float64.
    rtol, atol = (1e-5, 1e-8) if family == "deepseek_v3" else (1e-10, 1e-13)
    for s in specs:
        torch.testing.assert_close(ours[s.name], expected[s.name], rtol=rtol, atol=atol)


def test_expert_gradients_equal_autograd_through_the_grouped_kernel_in_float32():
    model = tiny_family("mixtral")
    assert model.config._experts_implementation not in (None, "eager")
    specs = _experts(select_layers(model))
    data = _data()
    ours, expected = sequence_gradients(model, specs, data, token_budget=64), _autograd(model, data, specs)
    for s in specs:
        torch.testing.assert_close(ours[s.name], expected[s.name], rtol=1e-4, atol=1e-6)


def test_expert_scores_equal_the_explicit_damped_kronecker_inverse():
    model = tiny_family("mixtral", dtype=torch.float64)
    model.config._experts_implementation = "eager"
    specs = select_layers(model, r"layers\.1\.mlp\.experts")
    train, queries = _data(12), _data(3, seed=2)
    factors = fit_factors(model, train, specs, token_budget=64, progress=False)
    result = compute_scores(model, factors, train, queries, token_budget=64, per_layer=True, progress=False)
    gq, gz = _autograd(model, queries, specs), _autograd(model, train, specs)
    for s in specs:
        inverse = torch.linalg.inv(explicit_fisher(factors.layers[s.name], factors.damping(s.name)))
        layer = (gq[s.name].flatten(1) @ inverse @ gz[s.name].flatten(1).T).numpy()
        np.testing.assert_allclose(result.per_layer[s.name], layer, rtol=1e-6, atol=1e-8 * np.abs(layer).max())


def test_an_expert_no_token_is_routed_to_is_left_out_of_the_fit():
    model = tiny_family("mixtral", dtype=torch.float64, num_experts_per_tok=1)
    model.config._experts_implementation = "eager"
    for layer in model.model.layers:  # logits (|w·h|, -|w·h|, 0, 0) up to sign: top-1 is expert 0 or 1, never 2 or 3
        w = layer.mlp.gate.weight.data
        w[1], w[2:] = -w[0], 0
    factors = fit_factors(model, _data(8), select_layers(model), token_budget=64, progress=False)
    assert sorted(factors.config.skipped) == sorted(f"model.layers.{b}.mlp.experts.{p}.{e}" for b in (0, 1)
                                                    for p in ("gate_up_proj", "down_proj") for e in (2, 3))
    assert all(torch.isfinite(f.lam).all() and f.lam.mean() > 0 for f in factors.layers.values())


def _share(model, keep) -> float:
    """The share of the blocks' ≥ 2-D weights whose names ``keep`` accepts, counted independently of ``coverage``."""
    weights = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and ".layers." in n}
    return sum(v for n, v in weights.items() if keep(n)) / sum(weights.values())


@pytest.mark.parametrize("family, router", [("mixtral", "mlp.gate."), ("phimoe", "mlp.router."), ("qwen2_moe", "mlp.gate."),
                                            ("gpt_oss", "mlp.router."), ("deepseek_v3", "mlp.gate."), ("qwen3_moe", "mlp.gate.")])
def test_the_default_tracks_every_expert_and_mlp_weight_but_no_router(family, router):
    model = tiny_family(family)
    specs = select_layers(model)
    found = coverage(model, specs)
    assert found["note"] == "" and found["untracked_mlp"] == []
    assert not any(router in s.name + "." or s.name.endswith("shared_expert_gate") for s in specs)
    expected = _share(model, lambda n: ".mlp." in n and router not in n and "shared_expert_gate" not in n)
    assert found["tracked_fraction"] == pytest.approx(expected)
    assert {d["kind"] for d in found["layers"]} >= {"expert"}
    everything = coverage(model, select_layers(model, "all"))
    assert everything["tracked_fraction"] > found["tracked_fraction"]


def test_codes_of_experts_made_inside_the_capture_give_exact_influence():
    """Codes project each expert's routed rows at the forward pass (compact, then scattered): with a budget that
    keeps every entry, code inner products are the exact scores."""
    from gradindex.codeplan import CompressionConfig, stage1_bytes
    from gradindex.compress import Compressor

    model = tiny_family("mixtral", dtype=torch.float64)
    model.config._experts_implementation = "eager"
    train, queries = _data(10), _data(3, seed=2)
    factors = fit_factors(model, train, select_layers(model), token_budget=64, progress=False)
    exact = compute_scores(model, factors, train, queries, token_budget=64, progress=False).scores
    full = 4 * sum(s.d_out * s.d_in for s in factors.specs) + stage1_bytes(16) + 64
    comp = Compressor(factors, CompressionConfig(budget=full, stage1_dim=16, block_cost=1e9, dtype="float32"))
    codes, _ = comp.encode(model, train, token_budget=64)
    np.testing.assert_allclose(comp.scores(codes, comp.embed(model, queries, token_budget=64)), exact,
                               rtol=1e-4, atol=1e-4 * np.abs(exact).max())
