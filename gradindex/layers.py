"""Which linear layers EK-FAC tracks, and their shapes.

A tracked layer is an ``nn.Linear``, a transformers ``Conv1D`` (GPT-2, weight stored transposed) or one
expert of a fused experts module (transformers 5 stores a MoE block's experts as 3-D parameters,
``experts.gate_up_proj[e]`` and ``experts.down_proj[e]``; ``experts`` runs them one expert at a time).
Every gradient in gradindex is kept in ``nn.Linear`` orientation, ``(d_out, d_in)``, with the bias as
an extra input column, so the kinds are indistinguishable past this module and ``capture``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import GradIndexError

try:  # transformers moved Conv1D around between releases.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

# Name components of the MLP matrices of the common decoder families:
# GPT-2 (mlp.c_fc/c_proj), GPT-NeoX/Pythia, Falcon, BLOOM (mlp.dense_h_to_4h/4h_to_h),
# Llama/Mistral/Qwen2/Gemma (mlp.gate/up/down_proj), OPT (fc1/fc2), GPT-J (mlp.fc_in/fc_out).
_MLP_PATTERN = re.compile(r"(^|\.)(mlp|feed_forward|ffn|block_sparse_moe|moe)\.|(^|\.)(fc1|fc2)$")
# Routers (and a shared expert's scalar gate) sit under mlp. but choose experts rather than compute the MLP:
# tracked with 'all' or a regex only (PhiMoE's mlp.router, JetMoE's router.layer, Qwen2-MoE's shared_expert_gate).
_ROUTER_PATTERN = re.compile(r"(^|\.)(gate|router|shared_expert_gate)(\.|$)")
# PEFT's LoRA matrices: ``<wrapped layer>.lora_A.<adapter>`` and ``.lora_B.<adapter>``, plain nn.Linear beside the
# frozen ``base_layer``. Found by name, not requires_grad: an adapter loaded for inference is frozen too.
_ADAPTER_PATTERN = re.compile(r"\.lora_[AB]\.[^.]+(\.weight)?$")  # a module, or its weight
DEFAULT_MODULES = "auto"  # 'lora' for a model with LoRA adapters (what was trained), else 'mlp'


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: its qualified name and gradient shape ``(d_out, d_in)``, bias column included."""

    name: str
    d_out: int
    d_in: int
    has_bias: bool
    transposed: bool  # Conv1D (and some experts modules) store the weight as (d_in, d_out)
    expert: int | None = None  # an expert of a fused module: name is "<experts module>.<projection>.<expert>"

    @property
    def module(self) -> str:
        """The module the capture hooks: the layer itself, or the experts module holding this expert."""
        return self.name if self.expert is None else self.name.rsplit(".", 2)[0]

    @property
    def projection(self) -> str:
        return self.name.rsplit(".", 2)[1]

    @property
    def weight(self) -> str:
        """The qualified name of the parameter this layer's gradient is (a slice of)."""
        return f"{self.name}.weight" if self.expert is None else f"{self.module}.{self.projection}"


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return LayerSpec(name, d_out, d_in + has_bias, has_bias, transposed=True)
    return LayerSpec(name, module.out_features, module.in_features + has_bias, has_bias, transposed=False)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module whose forward ``experts`` can run expert by expert (the flags
    ``use_experts_implementation`` sets, and its fused weights)."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")) and \
        isinstance(getattr(module, "down_proj", None), nn.Parameter) and \
        isinstance(getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None), nn.Parameter)


def expert_specs(name: str, module: nn.Module) -> list[LayerSpec]:
    """One spec per expert and projection of a fused experts module, projections in the order they run."""
    specs = []
    for proj in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"):
        w = getattr(module, proj)  # (E, d_out, d_in), or (E, d_in, d_out) transposed
        d_out, d_in = (w.shape[2], w.shape[1]) if module.is_transposed else (w.shape[1], w.shape[2])
        bias = bool(module.has_bias) and getattr(module, f"{proj}_bias", None) is not None
        specs += [LayerSpec(f"{name}.{proj}.{e}", d_out, d_in + bias, bias, bool(module.is_transposed), expert=e)
                  for e in range(w.shape[0])]
    return specs


def _blocks_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks: the children of the longest ModuleList."""
    best_name, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best_name, best_len = name, len(module)
    if best_name is None:
        return []
    return [f"{best_name}.{i}." for i in range(best_len)]


def select_layers(model: nn.Module, which: str = DEFAULT_MODULES) -> list[LayerSpec]:
    """Resolve ``which`` to tracked layers, in model order.

    ``auto`` (default): ``lora`` when the model has LoRA adapters, else ``mlp``; ``mlp``: the MLP matrices of
    every block, dense, shared experts and routed experts (one layer per expert), routers and adapters left
    out; ``lora``: every LoRA matrix in the blocks; ``all``: every linear layer and expert inside the blocks,
    adapters included (never embeddings or ``lm_head``); anything else is a regex searched in qualified layer
    names (an expert's is ``….experts.down_proj.3``, a LoRA matrix's ``….down_proj.lora_A.default``).
    """
    if not isinstance(which, str):
        raise GradIndexError(f"modules must be 'auto', 'mlp', 'lora', 'all' or a regex of module names, got {which!r}")
    layers = [(n, layer_spec(n, m)) for n, m in model.named_modules() if is_trackable(m)]
    layers += [(s.name, s) for n, m in model.named_modules() if is_experts_module(m) for s in expert_specs(n, m)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda ns: order[ns[1].module])  # model order, an experts module's layers where it sits
    prefixes = _blocks_prefixes(model)
    in_blocks = [(n, s) for n, s in layers if any(n.startswith(p) for p in prefixes)]
    adapters = [(n, s) for n, s in in_blocks if _ADAPTER_PATTERN.search(n)]
    which = resolve_modules(model, which)
    if which == "all":
        chosen = in_blocks
    elif which == "lora":
        chosen = adapters
        if not chosen:
            raise GradIndexError(f"modules 'lora': {type(model).__name__} has no LoRA adapter layers; use 'mlp' or 'all'")
    elif which == "mlp":
        chosen = [(n, s) for n, s in in_blocks
                  if _MLP_PATTERN.search(n) and not _ROUTER_PATTERN.search(n) and not _ADAPTER_PATTERN.search(n)]
        if not chosen:
            raise GradIndexError(
                f"no default MLP layers known for {type(model).__name__}; pass a module regex "
                f"(--modules) or 'all'. Linear layers: {_summarise([n for n, _ in layers])}"
            )
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise GradIndexError(f"invalid module regex {which!r}: {e}") from None
        chosen = [(n, s) for n, s in layers if pattern.search(n)]
        if not chosen:
            raise GradIndexError(
                f"module regex {which!r} matches no linear layer; candidates: {_summarise([n for n, _ in layers])}"
            )
    return [s for _, s in chosen]


# Separate attention projections: q/k/v outputs are heads' rows, o_proj's (OPT: out_proj's) inputs heads' columns.
# Fused qkv matrices (GPT-2's c_attn, NeoX's query_key_value) lay heads out per family and are not split.
_HEAD_PROJECTIONS = {"q_proj": (0, False), "k_proj": (0, True), "v_proj": (0, True), "o_proj": (1, False), "out_proj": (1, False)}


def head_blocks(model: nn.Module, spec: LayerSpec) -> tuple[int, int] | None:
    """How an attention projection's gradient splits into heads, ``(axis, heads)``: axis 0 its rows (q/k/v, by
    key-value heads for k and v), axis 1 its input columns (o_proj; the bias column belongs to no head); else None."""
    layout = _HEAD_PROJECTIONS.get(spec.name.rsplit(".", 1)[-1])
    if layout is None or spec.expert is not None:
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None)
    heads = (getattr(config, "num_key_value_heads", None) or heads) if layout[1] else heads
    width = spec.d_out if layout[0] == 0 else spec.d_in - spec.has_bias
    return (layout[0], heads) if isinstance(heads, int) and heads > 0 and width % heads == 0 else None


def resolve_modules(model: nn.Module, which: str) -> str:
    """``auto`` made concrete for ``model`` (``lora`` when it has LoRA adapter layers, else ``mlp``); others as given."""
    if which != "auto":
        return which
    return "lora" if any(_ADAPTER_PATTERN.search(n) and is_trackable(m) for n, m in model.named_modules()) else "mlp"


def _summarise(names: list[str], limit: int = 12) -> str:
    """Module names with block indices collapsed, so a 32-block model lists a handful of patterns."""
    collapsed = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names))
    shown = ", ".join(collapsed[:limit])
    return shown + (f", … ({len(collapsed) - limit} more)" if len(collapsed) > limit else "") if collapsed else "(none)"


def block_weights(model: nn.Module) -> dict[str, int]:
    """The blocks' parameters of two or more dimensions (weights, fused expert tensors), name → size."""
    prefixes = _blocks_prefixes(model)
    return {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and any(n.startswith(q) for q in prefixes)}


def coverage(model: nn.Module, layers: list[LayerSpec]) -> dict:
    """What a selection tracks: each layer's name, kind and shape, ``tracked_fraction`` (the share of the blocks'
    ≥ 2-D parameters it covers), ``untracked_mlp`` (the weights that matter that it leaves out: MLP and expert
    weights, or a LoRA model's adapters) and ``note``, the one-line warning about those (empty when there are none)."""
    weights = block_weights(model)
    modules = dict(model.named_modules())
    tracked: dict[str, int] = {}  # parameter → how many of its entries the selection covers
    for s in layers:
        tracked[s.weight] = tracked.get(s.weight, 0) + s.d_out * (s.d_in - s.has_bias)
        if s.expert is not None and s.has_bias:  # an expert's bias is a row of a 2-D tensor, counted as a weight
            tracked[f"{s.weight}_bias"] = tracked.get(f"{s.weight}_bias", 0) + s.d_out
    # The weights that matter: a LoRA model's adapters (all that was trained), else the MLP and experts.
    adapters = [n for n in weights if _ADAPTER_PATTERN.search(n)]
    matter = adapters or [n for n in weights if not _ROUTER_PATTERN.search(n) and (_MLP_PATTERN.search(n) or "expert" in n)]
    untracked_mlp = [n for n in matter if tracked.get(n, 0) < weights[n]]
    share = sum(weights[n] - tracked.get(n, 0) for n in untracked_mlp) / max(sum(weights.values()), 1)

    def kind(s: LayerSpec) -> str:
        if s.expert is not None:
            return "expert"
        return "lora" if _ADAPTER_PATTERN.search(s.name) else "conv1d" if isinstance(modules[s.name], Conv1D) else "linear"

    return {
        "layers": [{"name": s.name, "kind": kind(s), "d_out": s.d_out, "d_in": s.d_in, "bias": s.has_bias} for s in layers],
        "tracked_fraction": sum(min(c, weights.get(n, 0)) for n, c in tracked.items()) / max(sum(weights.values()), 1),
        "untracked_mlp": untracked_mlp,
        "note": f"{len(untracked_mlp)} {'LoRA' if adapters else 'MLP/expert'} weights ({share:.1%} of the blocks' weights) are not tracked, "
                f"e.g. {untracked_mlp[0]}" if untracked_mlp else "",
    }
