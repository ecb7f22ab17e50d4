"""Layers that are not a plain once-called (B, T, d) linear map: gradients still equal autograd's, or a
clear error says why the layer cannot be tracked; never a wrong number."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradindex.capture import capture, summed_nll
from gradindex.data import TokenizedSet, collate
from gradindex.errors import GradIndexError
from gradindex.fitting import fit_factors
from gradindex.layers import select_layers
from gradindex.model import context_length
from gradindex.scores import score_preconditioned, sequence_gradients

VOCAB, WIDTH, HEADS = 23, 8, 2


class TupleLinear(nn.Linear):
    """A router-like subclass that returns its logits with something else (PhiMoE, Llama 4)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.softmax(-1)


class NotLinear(nn.Linear):
    """A subclass whose first output is not the linear map of its input: must be refused."""

    def forward(self, x):
        return super().forward(x).tanh(), x


class Block(nn.Module):
    def __init__(self, odd: str):
        super().__init__()
        self.odd = odd
        self.router = (NotLinear if odd == "not_linear" else TupleLinear)(WIDTH, WIDTH)
        self.per_head = nn.Linear(WIDTH // HEADS, WIDTH // HEADS)  # applied to (B, T, H, d/H): a 4-D input
        self.shared = nn.Linear(WIDTH, WIDTH)  # called twice per forward
        self.unused = nn.Linear(WIDTH, WIDTH)  # never called

    def forward(self, h, mask):
        b, t, _ = h.shape
        h = h + self.router(h)[0]
        h = h + self.per_head(h.view(b, t, HEADS, -1)).reshape(b, t, -1)
        h = h + self.shared(torch.relu(self.shared(h)))
        if self.odd == "nan_at_padding":  # as float64 Gemma2 attention: NaN where the mask is 0
            h = h * (mask[..., None] / mask[..., None])
        return h


class OddLM(nn.Module):
    def __init__(self, odd: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block(odd), Block(odd)])
        self.head = nn.Linear(WIDTH, VOCAB)
        self.poison = odd == "nan_everywhere"

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        if self.poison:
            h = h * float("nan")
        for block in self.blocks:
            h = block(h, attention_mask.to(h.dtype))
        return SimpleNamespace(logits=self.head(h))


def _data(n=5):
    g = torch.Generator().manual_seed(1)
    return TokenizedSet.training_text([torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                                       for _ in range(n)])


def _autograd(model, data, module_name):
    """Per-sequence gradients of the summed NLL for one linear module, one sequence at a time, in Linear orientation."""
    module = dict(model.named_modules())[module_name]
    out = []
    for r in range(len(data)):
        batch = collate(data, [r])
        model.zero_grad()
        summed_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels).backward()
        out.append(torch.cat([module.weight.grad, module.bias.grad[:, None]], 1).clone())
    return torch.stack(out)


@pytest.mark.parametrize("layer", ["router", "per_head", "shared"])
def test_tuple_outputs_nd_inputs_and_repeated_calls_match_autograd(layer):
    model = OddLM().double()
    data = _data()
    name = f"blocks.1.{layer}"
    layers = select_layers(model, rf"blocks\.1\.{layer}$")
    batched = sequence_gradients(model, layers, data, token_budget=64)[name]  # padded batches
    torch.testing.assert_close(batched, _autograd(model, data, name), rtol=1e-10, atol=1e-12)


def test_per_token_scores_of_a_repeated_layer_sum_to_its_score():
    model = OddLM().double()
    data = _data()
    layers = select_layers(model, r"shared|per_head")
    p = {s.name: torch.randn(2, s.d_out, s.d_in, dtype=torch.float64) for s in layers}
    result = score_preconditioned(model, layers, p, data, per_token=True, progress=False)
    for r in range(len(data)):
        assert result.per_token[r].shape == (2, len(data.input_ids[r]))
        assert result.per_token[r].sum(-1) == pytest.approx(result.scores[:, r], rel=1e-4, abs=1e-6)


def test_a_layer_never_called_is_skipped_by_the_fit_with_its_name_recorded():
    model = OddLM().double()
    layers = select_layers(model, r"shared|unused")
    factors = fit_factors(model, _data(), layers, progress=False)
    assert factors.config.skipped == ["blocks.0.unused", "blocks.1.unused"]
    assert sorted(factors.layers) == ["blocks.0.shared", "blocks.1.shared"]
    assert all(torch.isfinite(f.lam).all() for f in factors.layers.values())


@pytest.mark.bad_input
def test_a_tuple_whose_first_element_is_not_the_linear_output_is_refused():
    model = OddLM("not_linear").double()
    with pytest.raises(GradIndexError, match=r"layer blocks\.0\.router \(NotLinear\) returns tuple, not its linear output"):
        capture(model, select_layers(model, "router"), collate(_data(), [0, 1]), lambda *a: None)


def test_nan_at_padded_positions_does_not_leak_into_the_gradients():
    model = OddLM("nan_at_padding").double()
    data = _data()
    layers = select_layers(model, r"blocks\.1\.shared")
    batched = sequence_gradients(model, layers, data, token_budget=64)["blocks.1.shared"]
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, _autograd(model, data, "blocks.1.shared"), rtol=1e-10, atol=1e-12)


@pytest.mark.bad_input
def test_non_finite_values_are_reported_with_the_layer_name():
    model = OddLM("nan_everywhere").double()
    with pytest.raises(GradIndexError, match=r"layer blocks\.0\.shared: \d+ non-finite values in its input"):
        fit_factors(model, _data(), select_layers(model, "shared"), progress=False)


def test_context_length_is_read_from_mpt_max_seq_len():
    import transformers as tf

    config = tf.MptConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=48, vocab_size=50)
    assert context_length(tf.MptForCausalLM(config)) == 48
