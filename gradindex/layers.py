"""Which linear layers EK-FAC tracks, and their shapes.

A tracked layer is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2, weight stored transposed).
Every gradient in gradindex is kept in ``nn.Linear`` orientation, ``(d_out, d_in)``, with the bias as
an extra input column, so the two kinds are indistinguishable past this module.
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
_MLP_PATTERN = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.|(^|\.)(fc1|fc2)$")


@dataclass(frozen=True)
class LayerSpec:
    """A tracked layer: its qualified name and gradient shape ``(d_out, d_in)``, bias column included."""

    name: str
    d_out: int
    d_in: int
    has_bias: bool
    transposed: bool  # Conv1D stores its weight as (d_in, d_out)


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return LayerSpec(name, d_out, d_in + has_bias, has_bias, transposed=True)
    return LayerSpec(name, module.out_features, module.in_features + has_bias, has_bias, transposed=False)


def _blocks_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks: the children of the longest ModuleList."""
    best_name, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best_name, best_len = name, len(module)
    if best_name is None:
        return []
    return [f"{best_name}.{i}." for i in range(best_len)]


def select_layers(model: nn.Module, which: str = "mlp") -> list[LayerSpec]:
    """Resolve ``which`` to tracked layers, in model order.

    ``mlp`` (default): the MLP matrices of every block; ``all``: every linear layer inside the blocks
    (never embeddings or ``lm_head``); anything else is a regex searched in qualified module names.
    """
    if not isinstance(which, str):
        raise GradIndexError(f"modules must be 'mlp', 'all' or a regex of module names, got {which!r}")
    linear = [(n, m) for n, m in model.named_modules() if is_trackable(m)]
    prefixes = _blocks_prefixes(model)
    in_blocks = [(n, m) for n, m in linear if any(n.startswith(p) for p in prefixes)]
    if which == "all":
        chosen = in_blocks
    elif which == "mlp":
        chosen = [(n, m) for n, m in in_blocks if _MLP_PATTERN.search(n)]
        if not chosen:
            raise GradIndexError(
                f"no default MLP layers known for {type(model).__name__}; pass a module regex "
                f"(--modules) or 'all'. Linear layers: {_summarise([n for n, _ in linear])}"
            )
    else:
        try:
            pattern = re.compile(which)
        except re.error as e:
            raise GradIndexError(f"invalid module regex {which!r}: {e}") from None
        chosen = [(n, m) for n, m in linear if pattern.search(n)]
        if not chosen:
            raise GradIndexError(
                f"module regex {which!r} matches no linear layer; candidates: {_summarise([n for n, _ in linear])}"
            )
    return [layer_spec(n, m) for n, m in chosen]


def _summarise(names: list[str], limit: int = 12) -> str:
    """Module names with block indices collapsed, so a 32-block model lists a handful of patterns."""
    collapsed = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))
    shown = ", ".join(collapsed[:limit])
    return shown + (f", … ({len(collapsed) - limit} more)" if len(collapsed) > limit else "") if collapsed else "(none)"


def block_weights(model: nn.Module) -> dict[str, int]:
    """The blocks' parameters of two or more dimensions (weights, fused expert tensors), name → size."""
    prefixes = _blocks_prefixes(model)
    return {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and any(n.startswith(q) for q in prefixes)}


def coverage(model: nn.Module, layers: list[LayerSpec]) -> dict:
    """What a selection tracks: each layer's name, kind and shape, ``tracked_fraction`` (the share of the blocks'
    ≥ 2-D parameters it covers), ``untracked_mlp`` (MLP or expert weights it leaves out, the ones that matter)
    and ``note``, the one-line warning about those (empty when there are none)."""
    weights = block_weights(model)
    modules = dict(model.named_modules())
    tracked = {f"{s.name}.weight" for s in layers}
    untracked_mlp = [n for n in weights if n not in tracked and (_MLP_PATTERN.search(n) or "expert" in n)]
    share = sum(weights[n] for n in untracked_mlp) / max(sum(weights.values()), 1)
    return {
        "layers": [{"name": s.name, "kind": "conv1d" if isinstance(modules[s.name], Conv1D) else "linear",
                    "d_out": s.d_out, "d_in": s.d_in, "bias": s.has_bias} for s in layers],
        "tracked_fraction": sum(weights.get(n, 0) for n in tracked) / max(sum(weights.values()), 1),
        "untracked_mlp": untracked_mlp,
        "note": f"{len(untracked_mlp)} MLP/expert weights ({share:.1%} of the blocks' weights) are not tracked, "
                f"e.g. {untracked_mlp[0]}" if untracked_mlp else "",
    }
