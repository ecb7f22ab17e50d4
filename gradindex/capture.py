"""Per-token inputs and output gradients of the tracked layers, captured with hooks.

Modules are never replaced: a forward hook keeps each tracked layer's input and output, and one
``torch.autograd.grad`` call asks for the loss gradient with respect to those outputs only, so no
parameter gradient is ever computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .layers import LayerSpec


@dataclass
class LayerCapture:
    """One layer's token matrices for a batch: ``a`` (B, T, d_in) with the bias column, ``delta`` (B, T, d_out).

    ``a`` is zero on padding, so sums over tokens need no mask; the per-sequence gradient is
    ``delta[b].T @ a[b]``.
    """

    a: torch.Tensor
    delta: torch.Tensor


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over scored positions (the loss whose gradient we use).

    The labels are shifted rather than the logits, so the (B, T, V) logits are never copied.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")


@torch.no_grad()
def sample_labels(logits: torch.Tensor, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (true Fisher), at the scored positions.

    One generator per sequence, seeded by its row, makes the draw independent of batching and padding.
    Inverse-CDF sampling: a tenth of ``torch.multinomial``'s time on large vocabularies.
    """
    sampled = torch.full_like(labels, -100)
    for b, seed in enumerate(seeds):
        scored = (labels[b, 1:] != -100).nonzero().squeeze(-1)
        if scored.numel() == 0:
            continue
        cdf = torch.softmax(logits[b, scored].float(), dim=-1).cumsum(-1)
        g = torch.Generator(device=logits.device).manual_seed(seed)
        u = torch.rand(len(scored), 1, generator=g, device=logits.device) * cdf[:, -1:]
        sampled[b, scored + 1] = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    return sampled


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and the dtype statistics are computed in: float64 models stay float64, others float32."""
    p = next(model.parameters())
    return p.device, _compute_dtype(p)


@contextmanager
def _graph_without_parameter_grads(model: nn.Module) -> Iterator[None]:
    """Build an autograd graph from the embeddings on, with every parameter frozen for the duration."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def capture(model: nn.Module, layers: list[LayerSpec], batch: Batch, sample_seed: int | None = None) -> dict[str, LayerCapture]:
    """Run ``batch`` through ``model`` and return each tracked layer's (a, delta).

    ``sample_seed`` set: the loss uses labels sampled from the model (true Fisher), one generator per
    sequence seeded with ``sample_seed + row``; unset: the batch's own labels.
    """
    modules = dict(model.named_modules())
    mask = batch.attention_mask
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(spec: LayerSpec):
        def keep(_module, args, out):
            x = args[0].detach()
            if x.dim() == 2:  # some MLPs flatten (B*T, d) before their linear layers
                x = x.view(*mask.shape, -1)
            m = mask.unsqueeze(-1).to(x.dtype)
            x = x * m
            inputs[spec.name] = torch.cat([x, m], dim=-1) if spec.has_bias else x
            outputs[spec.name] = out

        return keep

    handles = [modules[s.name].register_forward_hook(hook(s)) for s in layers]
    try:
        with torch.enable_grad(), _graph_without_parameter_grads(model):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits = logits.to(_compute_dtype(logits))
            labels = batch.labels
            if sample_seed is not None:
                labels = sample_labels(logits, labels, [sample_seed + r for r in batch.rows])
            loss = summed_nll(logits, labels)
            names = [s.name for s in layers]
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, g in zip(names, grads):
        a = inputs[name]
        delta = torch.zeros(*a.shape[:-1], outputs[name].shape[-1], dtype=a.dtype, device=a.device) if g is None else g
        result[name] = LayerCapture(a=a, delta=delta.view(*mask.shape, -1).to(a.dtype))
    return result
