import pytest
from torch import nn

from gradindex.errors import GradIndexError
from gradindex.layers import select_layers
from tiny import tiny_model

EXPECTED_MLP = {
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
    "neox": ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"],
    "llama": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "mistral": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "qwen2": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "opt": ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_MLP))
def test_default_layers_are_the_mlp_matrices_of_every_block(kind):
    model = tiny_model(kind, layers=2)
    names = [s.name for s in select_layers(model)]
    assert names == EXPECTED_MLP[kind] + [n.replace(".0.", ".1.") for n in EXPECTED_MLP[kind]]


def test_gpt2_conv1d_shapes_are_in_linear_orientation_with_bias_column():
    model = tiny_model("gpt2", width=16)
    fc, proj = select_layers(model)[:2]
    assert (fc.d_out, fc.d_in, fc.has_bias, fc.transposed) == (64, 17, True, True)
    assert (proj.d_out, proj.d_in) == (16, 65)


def test_all_means_every_linear_layer_in_the_blocks_but_never_embeddings_or_head():
    model = tiny_model("llama", layers=2)
    names = [s.name for s in select_layers(model, "all")]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_regex_selects_by_name_and_may_name_the_head():
    model = tiny_model("gpt2", layers=2)
    assert [s.name for s in select_layers(model, r"h\.1\.attn\.c_attn")] == ["transformer.h.1.attn.c_attn"]
    assert [s.name for s in select_layers(model, r"^lm_head$")] == ["lm_head"]


def test_unknown_regex_lists_candidates():
    with pytest.raises(GradIndexError, match=r"matches no linear layer; candidates: .*mlp\.c_fc"):
        select_layers(tiny_model("gpt2"), "nonexistent_module")
    with pytest.raises(GradIndexError, match="invalid module regex"):
        select_layers(tiny_model("gpt2"), "(")


def test_unknown_architecture_without_default_lists_module_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(GradIndexError, match=r"no default MLP layers known for Odd.*blocks\.N\.mix"):
        select_layers(Odd())
    assert [s.name for s in select_layers(Odd(), "all")] == ["blocks.0.mix", "blocks.1.mix"]


def test_tracked_fraction_is_the_share_of_the_blocks_weights_covered():
    from gradindex.layers import coverage

    model = tiny_model("llama", layers=2)
    blocks = {n: p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() >= 2}
    mlp = sum(v for n, v in blocks.items() if ".mlp." in n)
    found = coverage(model, select_layers(model))
    assert found["tracked_fraction"] == pytest.approx(mlp / sum(blocks.values()))
    assert [d["name"] for d in found["layers"]] == [s.name for s in select_layers(model)] and found["note"] == ""
    assert coverage(model, select_layers(model, "all"))["tracked_fraction"] == pytest.approx(1.0)
    partial = coverage(model, select_layers(model, "gate_proj"))
    assert partial["untracked_mlp"] == [n for n in blocks if "up_proj" in n or "down_proj" in n]
    assert partial["note"].startswith("4 MLP/expert weights")


def test_expert_weights_left_untracked_are_named():
    from gradindex.layers import coverage
    from tiny import tiny_family

    model = tiny_family("mixtral")
    found = coverage(model, select_layers(model, "self_attn"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in found["untracked_mlp"] and found["tracked_fraction"] < 0.2
    assert found["note"].startswith("4 MLP/expert weights (88.1%") and "mlp.gate" not in " ".join(found["untracked_mlp"])
    # Llama 4 runs its experts with a forward of its own (every token through every expert, pre-scaled): not
    # tracked, and said so, while its shared expert is.
    model = tiny_family("llama4_text")
    found = coverage(model, select_layers(model))
    assert found["untracked_mlp"][:2] == ["model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.feed_forward.experts.down_proj"]
    assert all("shared_expert" in d["name"] for d in found["layers"])


def test_layers_command_prints_the_selection_as_json(tmp_path):
    import json
    import subprocess
    import sys

    from tiny import word_tokenizer

    tiny_model("gpt2").save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "cli.main", "layers", str(tmp_path / "m"), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert [d["kind"] for d in found["layers"]] == ["conv1d"] * 4 and found["tracked_fraction"] == pytest.approx(2 / 3)
