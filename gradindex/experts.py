"""Fused MoE experts run one expert at a time, so that each expert's matrix products are tensors of their own.

transformers 5 keeps a MoE block's experts as 3-D parameters (``gate_up_proj[e]``, ``down_proj[e]``) and runs
them with grouped or batched kernels (``config._experts_implementation``) in which no single expert's input
or output exists. While ``capture`` runs, an experts module's forward is :func:`forward_by_expert`: the eager
computation of ``use_experts_implementation`` (the module's own ``_apply_gate`` or ``act_fn``, biases, weight
layout and post-expert norm), with each expert's input rows and output handed to ``track``. The tests check it
against autograd through the model's own kernels, family by family.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import GradIndexError

# (projection, expert, token rows, input (n, d_in), output (n, d_out)) → the output to carry on with
Track = Callable[[str, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _project(module: nn.Module, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, proj)[e]
    bias = getattr(module, f"{proj}_bias", None) if module.has_bias else None
    return F.linear(x, w.T if module.is_transposed else w, None if bias is None else bias[e])


def forward_by_expert(module: nn.Module, track: Track, hidden_states: torch.Tensor, *routing, **named) -> torch.Tensor:
    """The experts module's output for ``hidden_states`` (…, d) routed by (top-k expert ids, their weights)."""
    routing = routing + tuple(named.values())  # families name them top_k_index/top_k_weights or router_indices/routing_weights
    if len(routing) != 2:
        raise GradIndexError(f"{type(module).__name__}: expected (hidden_states, expert ids, routing weights), "
                             f"got {1 + len(routing)} arguments; leave its experts out of --modules")
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    ids, weights = (r.reshape(x.shape[0], -1) for r in routing)
    out = torch.zeros_like(x)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    for e in torch.unique(ids).tolist():
        if not 0 <= e < module.num_experts:  # expert-parallel sentinels: another rank's expert
            continue
        rows, slot = torch.where(ids == e)
        routed = x[rows]
        h = track(first, e, rows, routed, _project(module, first, e, routed))
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = track("down_proj", e, rows, h, _project(module, "down_proj", e, h))
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
    return out.reshape(hidden_states.shape)
