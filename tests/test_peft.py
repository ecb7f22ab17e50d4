"""PEFT LoRA models: the default tracks the adapters (what was trained), gradients and scores of LoRA matrices
are exact, and an index built from a PeftModel object or an adapter folder reopens by its path alone."""

import json

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from gradindex import GradIndex, build  # noqa: E402
from gradindex.codeplan import CompressionConfig  # noqa: E402
from gradindex.data import TokenizedSet  # noqa: E402
from gradindex.fitting import fit_factors  # noqa: E402
from gradindex.layers import coverage, resolve_modules, select_layers  # noqa: E402
from gradindex.model import load_model  # noqa: E402
from gradindex.scores import compute_scores, sequence_gradients  # noqa: E402
from test_math import explicit_fisher  # noqa: E402
from tiny import autograd_gradients as _autograd, random_texts, tiny_model, word_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora(model, targets=TARGETS):
    """A PeftModel with random (not zero) LoRA matrices, so every adapter has a non-zero gradient."""
    config = peft.LoraConfig(r=2, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(3)
    return peft.get_peft_model(model, config)


def _data(n=5, seed=1, vocab=90):
    g = torch.Generator().manual_seed(seed)
    return TokenizedSet.training_text([torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                                       for _ in range(n)])


def test_the_default_is_the_lora_matrices_and_mlp_means_the_base_mlp():
    inner = lora(tiny_model("llama")).get_base_model()
    default = [s.name for s in select_layers(inner)]
    assert resolve_modules(inner, "auto") == "lora" and resolve_modules(tiny_model("llama"), "auto") == "mlp"
    assert default == [f"model.layers.{b}.{m}.lora_{ab}.default" for b in (0, 1)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"]
    mlp = [s.name for s in select_layers(inner, "mlp")]
    assert mlp == [f"model.layers.{b}.mlp.{m}" for b in (0, 1) for m in ("gate_proj", "up_proj", "down_proj.base_layer")]
    everything = {s.name for s in select_layers(inner, "all")}
    assert set(default) | set(mlp) < everything
    with pytest.raises(Exception, match="has no LoRA adapter layers"):
        select_layers(tiny_model("llama"), "lora")


def test_coverage_of_a_lora_model_warns_about_adapters_left_out():
    inner = lora(tiny_model("llama")).get_base_model()
    found = coverage(inner, select_layers(inner))
    assert found["note"] == "" and {d["kind"] for d in found["layers"]} == {"lora"}
    weights = {n: p.numel() for n, p in inner.named_parameters() if p.dim() >= 2 and ".layers." in n}
    assert found["tracked_fraction"] == pytest.approx(sum(v for n, v in weights.items() if ".lora_" in n) / sum(weights.values()))
    partial = coverage(inner, select_layers(inner, r"mlp\.down_proj\.lora_"))
    assert partial["note"].startswith("8 LoRA weights") and all("self_attn" in n for n in partial["untracked_mlp"])


def test_lora_gradients_equal_autograd_and_scores_the_explicit_kronecker_inverse_in_float64():
    inner = lora(tiny_model("llama", dtype=torch.float64)).get_base_model()
    specs = select_layers(inner)
    train, queries = _data(10), _data(3, seed=2)
    ours, expected = sequence_gradients(inner, specs, train, token_budget=48), _autograd(inner, train, specs)
    for s in specs:
        assert expected[s.name].abs().sum() > 0
        torch.testing.assert_close(ours[s.name], expected[s.name], rtol=1e-10, atol=1e-13)
    factors = fit_factors(inner, train, specs, token_budget=48, progress=False)
    result = compute_scores(inner, factors, train, queries, token_budget=48, per_layer=True, progress=False)
    gq = _autograd(inner, queries, specs)
    for s in specs:
        inverse = torch.linalg.inv(explicit_fisher(factors.layers[s.name], factors.damping(s.name)))
        layer = (gq[s.name].flatten(1) @ inverse @ expected[s.name].flatten(1).T).numpy()
        np.testing.assert_allclose(result.per_layer[s.name], layer, rtol=1e-6, atol=1e-8 * np.abs(layer).max())


def _texts(path, n=24):
    path.write_text("\n".join(json.dumps({"text": t}) for t in random_texts(n, seed=5)))
    return path


OPTIONS = dict(compression=CompressionConfig(budget=4096, stage1_dim=32), shard_size=16)


def test_an_index_built_from_a_peft_model_object_reopens_by_its_path(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    from transformers import AutoModelForCausalLM

    model = lora(AutoModelForCausalLM.from_pretrained(base))
    out = build(model, _texts(tmp_path / "train.jsonl"), tmp_path / "idx", tokenizer=word_tokenizer(), progress=False, **OPTIONS)
    assert (out / "adapter" / "adapter_config.json").is_file()
    index = GradIndex.open(out)  # no model given: the saved adapter on its base, the same weights
    in_memory = GradIndex.open(out, model=model, tokenizer=word_tokenizer())
    assert index.lm.model_hash == in_memory.lm.model_hash
    assert {s.name.rsplit(".", 2)[1] for s in index.factors.specs} == {"lora_A", "lora_B"}
    a, b = index.query("the king", "wrote a book", k=5), in_memory.query("the king", "wrote a book", k=5)
    assert [h.row for h in a.hits] == [h.row for h in b.hits] and len(a.hits) == 5
    np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-5)
    moved = tmp_path / "moved"
    out.rename(moved)
    assert GradIndex.open(moved).lm.model_hash == index.lm.model_hash


def test_an_adapter_folder_without_a_tokenizer_loads_its_base_models(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    from transformers import AutoModelForCausalLM

    lora(AutoModelForCausalLM.from_pretrained(base)).save_pretrained(tmp_path / "adapter")
    lm = load_model(tmp_path / "adapter")
    assert lm.tokenizer("the king").input_ids == word_tokenizer()("the king").input_ids
    assert lm.name == str((tmp_path / "adapter").resolve()) and lm.adapter is None
    assert resolve_modules(lm.model, "auto") == "lora"
