"""Per-head influence of attention projections: each head's block of the preconditioned query gradient against the
same block of the training gradient, summing to the layer's score; checked against an explicit damped Kronecker inverse."""

import numpy as np
import pytest
import torch

from gradindex.errors import GradIndexError
from gradindex.fitting import fit_factors
from gradindex.layers import head_blocks, select_layers
from gradindex.scores import ScoreResult, compute_scores
from test_experts import _data
from test_math import explicit_fisher
from tiny import autograd_gradients as _autograd, tiny_family, tiny_model


def test_head_blocks_follow_the_config_and_skip_what_has_no_heads():
    model = tiny_family("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    blocks = {s.name.rsplit(".", 1)[1]: head_blocks(model, s) for s in select_layers(model, "all") if ".0." in s.name}
    assert blocks == {"q_proj": (0, 4), "k_proj": (0, 2), "v_proj": (0, 2), "o_proj": (1, 4),
                      "gate_proj": None, "up_proj": None, "down_proj": None}
    gpt2 = tiny_model("gpt2")
    assert all(head_blocks(gpt2, s) is None for s in select_layers(gpt2, "all"))  # fused c_attn: not split


def test_per_head_scores_sum_to_the_layer_and_equal_the_explicit_inverse_in_float64(tmp_path):
    model = tiny_family("llama", dtype=torch.float64, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                        hidden_size=16, attention_bias=True)
    specs = select_layers(model, r"layers\.1\.self_attn")
    train, queries = _data(8), _data(2, seed=2)
    factors = fit_factors(model, train, specs, token_budget=64, progress=False)
    result = compute_scores(model, factors, train, queries, token_budget=64, per_layer=True, per_head=True, progress=False)
    assert sorted(result.per_head) == sorted(s.name for s in specs)
    gq, gz = _autograd(model, queries, specs), _autograd(model, train, specs)
    for s in specs:
        axis, h = head_blocks(model, s)
        heads = result.per_head[s.name]
        assert heads.shape == (2, 8, h)
        inverse = torch.linalg.inv(explicit_fisher(factors.layers[s.name], factors.damping(s.name)))
        p = (gq[s.name].flatten(1) @ inverse).reshape(gq[s.name].shape)  # P_q = H⁻¹ g_q (H symmetric)
        size = (s.d_out if axis == 0 else s.d_in - s.has_bias) // h
        for k in range(h):
            block = (slice(None), slice(k * size, (k + 1) * size)) if axis == 0 else (slice(None), slice(None), slice(k * size, (k + 1) * size))
            expected = (p[block].flatten(1) @ gz[s.name][block].flatten(1).T).numpy()
            np.testing.assert_allclose(heads[..., k], expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
        rest = result.per_layer[s.name] - heads.sum(-1)  # q/k/v: nothing; o_proj: its bias column
        if axis == 0:
            np.testing.assert_allclose(rest, 0, atol=1e-6 * np.abs(result.per_layer[s.name]).max())
    result.save(tmp_path / "s.npy")
    assert ScoreResult.load(tmp_path / "s.npy").per_head.keys() == result.per_head.keys()
    with pytest.raises(GradIndexError, match="per-head scores need exact query gradients"):
        compute_scores(model, factors, train, queries, token_budget=64, per_head=True, query_rank=1, progress=False)


def test_the_scores_command_writes_per_head_scores(tmp_path):
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from tiny import random_texts, word_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(12)))
    runner, model, data = CliRunner(), str(tmp_path / "model"), str(tmp_path / "train.jsonl")
    fitted = runner.invoke(app, ["fit", model, "--data", data, "--modules", "all", "--out", str(tmp_path / "factors")])
    assert fitted.exit_code == 0, fitted.output
    scored = runner.invoke(app, ["scores", model, "--factors", str(tmp_path / "factors"), "--data", data, "--prompt", "the king",
                                 "--completion", " wrote a book", "--per-layer", "--per-head", "--out", str(tmp_path / "s.npy")])
    assert scored.exit_code == 0, scored.output
    heads, layers = np.load(tmp_path / "s.per_head.npz"), np.load(tmp_path / "s.per_layer.npz")
    assert sorted(heads) == [f"model.layers.{b}.self_attn.{p}" for b in (0, 1) for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    name = "model.layers.1.self_attn.q_proj"
    assert heads[name].shape == (1, 12, 2)
    np.testing.assert_allclose(heads[name].sum(-1), layers[name], rtol=1e-4, atol=1e-6 * np.abs(layers[name]).max())
