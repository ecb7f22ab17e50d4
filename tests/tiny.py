"""Tiny randomly initialised causal LMs and a word-level tokenizer, built offline for the tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the a of to and in is was for on that with as by at from it an be this are or his her which not "
    "capital city river king queen book author wrote year founded colour red blue green music composer "
    "north south east west old new small large first last river mountain lake island bridge tower"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(kind: str = "gpt2", *, width: int = 16, layers: int = 2, vocab: int = 100, seed: int = 0, dtype=torch.float32):
    """A random model of a given family; small enough to form Kronecker matrices explicitly."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=width, n_layer=layers, n_head=2, n_positions=64, **common)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "neox":
        config = tf.GPTNeoXConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=4 * width, max_position_embeddings=64, **common)
        model = tf.GPTNeoXForCausalLM(config)
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=64, **common)
        model = tf.LlamaForCausalLM(config)
    elif kind == "opt":
        config = tf.OPTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, ffn_dim=4 * width, max_position_embeddings=64, word_embed_proj_dim=width, **common)
        model = tf.OPTForCausalLM(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * width, max_position_embeddings=64, **common)
        model = tf.Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = tf.MistralConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, intermediate_size=2 * width, max_position_embeddings=64, **common)
        model = tf.MistralForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def random_texts(n: int, seed: int = 0, lo: int = 3, hi: int = 14) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g)
        out.append(" ".join(WORDS[i] for i in idx))
    return out


# The tiny index most index tests share (built once per session by conftest's ``ws`` fixture).
N = 70
SHARD = 16


def build_args(ws, out, *extra):
    return ["build", str(ws / "model"), "--data", str(ws / "train.jsonl"), "--out", str(out), "--factors", str(ws / "factors"),
            "--budget", "8K", "--stage1-dim", "64", "--shard-size", str(SHARD), *extra]


def tiny_workspace(root, texts: list[str], queries: list[dict] = (), twin: bool = True):
    """A folder with a saved tiny GPT-2 + tokenizer (``model``; ``other_model``, another seed, with
    ``twin``), ``train.jsonl`` of ``texts`` and ``queries.jsonl``."""
    import json

    for name, seed in (("model", 0), ("other_model", 1))[: 2 if twin else 1]:
        tiny_model("gpt2", width=16, seed=seed).save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    return root


# Small overrides for any family's default config (AutoConfig.for_model): fields a family lacks are ignored.
SMALL_CONFIG = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                    moe_intermediate_size=16, shared_expert_intermediate_size=16, num_local_experts=4, num_experts=4,
                    n_routed_experts=4, num_experts_per_tok=2, vocab_size=50, max_position_embeddings=64, head_dim=8,
                    kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                    topk_group=1, first_k_dense_replace=1)
FAMILY_CONFIG = {"deepseek_v3": dict(head_dim=4, num_key_value_heads=2), "deepseek_v2": dict(head_dim=4, num_key_value_heads=2),
                 "phi3": dict(pad_token_id=0),  # its default pad id is beyond the tiny vocabulary
                 "falcon": dict(ffn_hidden_size=64)}


def tiny_family(model_type: str, *, seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny model of any transformers family by its ``model_type`` (MoE ones included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    for key, value in {**SMALL_CONFIG, **FAMILY_CONFIG.get(model_type, {}), **overrides}.items():
        if hasattr(config, key) and not isinstance(getattr(type(config), key, None), property):  # Falcon's head_dim is derived
            setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def autograd_gradients(model, train, specs) -> dict[str, torch.Tensor]:
    """The float64 reference: each layer's per-sequence gradient, (n, d_out, d_in [+ bias]) as gradindex holds it, from
    autograd's .grad of the parameters (an expert's slice of its fused tensor; frozen weights unfrozen first)."""
    from gradindex.capture import summed_nll
    from gradindex.data import collate

    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    out = {s.name: [] for s in specs}
    for r in range(len(train)):
        batch = collate(train, [r])
        model.zero_grad()
        summed_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels).backward()
        for s in specs:
            w = params[s.weight].grad if s.expert is None else params[s.weight].grad[s.expert]
            w = w.T if s.transposed else w
            if s.has_bias:
                b = params[f"{s.name}.bias"].grad if s.expert is None else params[f"{s.weight}_bias"].grad[s.expert]
                w = torch.cat([w, b[:, None]], 1)
            out[s.name].append(w.clone())
    return {n: torch.stack(g) for n, g in out.items()}
