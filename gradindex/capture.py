"""Per-token inputs and output gradients of the tracked layers, captured with hooks.

Modules are never replaced: a forward hook keeps each tracked layer's input, a tensor hook on its output
receives the loss gradient during the one backward pass (run down to the embeddings with every parameter
frozen, so no parameter gradient is ever computed), and a callback consumes the layer's pair there and
then: no more than one layer's output gradients exist at a time.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch
from .layers import LayerSpec


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
def _graph_without_parameter_grads(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Build an autograd graph from the embeddings on, with every parameter frozen for the duration;
    yields the list the embedding outputs are collected into (what the backward pass runs down to)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    embedded: list[torch.Tensor] = []

    def track(_m, _i, out):
        embedded.append(out.requires_grad_(True))

    handle = model.get_input_embeddings().register_forward_hook(track)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield embedded
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


# Called with (layer name, a, delta) for each tracked layer as its output gradient arrives in the backward
# pass: a (B, T, d_in') is the layer input after ``transform`` (bias column included, zero on padding),
# delta (B, T, d_out) the loss gradient of its output. Only one layer's delta exists at a time.
LayerFn = Callable[[str, torch.Tensor, torch.Tensor], None]
InputTransform = Callable[[str, torch.Tensor], torch.Tensor]

# One capture at a time in a process: the hooks sit on modules every caller shares (a second thread's
# forward would write into the first one's buffers) and parameter flags are toggled for the duration.
_CAPTURE_LOCK = threading.RLock()


def capture(model: nn.Module, layers: list[LayerSpec], batch: Batch, on_layer: LayerFn, *,
            transform: InputTransform | None = None, sample_seed: int | None = None) -> None:
    """Run ``batch`` through ``model`` and hand each tracked layer's (a, delta) to ``on_layer``.

    Memory is the model's own activations plus each layer's (transformed) inputs until its gradient
    arrives: ``transform`` (e.g. a projection onto a few eigenvectors, LoGra-style) shrinks them at the
    forward pass, and every delta is consumed and dropped inside the backward pass.
    ``sample_seed`` set: the loss uses labels sampled from the model (true Fisher), one generator per
    sequence seeded with ``sample_seed + row``; unset: the batch's own labels.
    """
    modules = dict(model.named_modules())
    mask = batch.attention_mask
    inputs: dict[str, torch.Tensor] = {}
    pending: dict[str, LayerSpec] = {s.name: s for s in layers}
    handles = []

    def deliver(spec: LayerSpec, grad: torch.Tensor) -> None:
        a = inputs.pop(spec.name)
        on_layer(spec.name, a, grad.reshape(*mask.shape, -1).to(a.dtype))
        pending.pop(spec.name, None)

    def forward_hook(spec: LayerSpec):
        def keep(_module, args, out):
            x = args[0].detach()
            if x.dim() == 2:  # some MLPs flatten (B*T, d) before their linear layers
                x = x.view(*mask.shape, -1)
            m = mask.unsqueeze(-1).to(x.dtype)
            x = x * m
            a = torch.cat([x, m], dim=-1) if spec.has_bias else x
            a = a.to(dtype)
            inputs[spec.name] = transform(spec.name, a) if transform is not None else a
            if out.requires_grad:
                out.register_hook(lambda grad: deliver(spec, grad))

        return keep

    device, dtype = device_and_dtype(model)
    with _CAPTURE_LOCK:
        try:
            handles = [modules[s.name].register_forward_hook(forward_hook(s)) for s in layers]
            with torch.enable_grad(), _graph_without_parameter_grads(model) as embedded:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                logits = logits.to(_compute_dtype(logits))
                labels = batch.labels
                if sample_seed is not None:
                    labels = sample_labels(logits, labels, [sample_seed + r for r in batch.rows])
                loss = summed_nll(logits, labels)
                if loss.requires_grad:
                    torch.autograd.grad(loss, embedded, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    for name, spec in list(pending.items()):  # outputs the loss does not depend on: zero gradient
        if name in inputs:
            a = inputs.pop(name)
            on_layer(name, a, torch.zeros(*mask.shape, spec.d_out, dtype=a.dtype, device=a.device))
