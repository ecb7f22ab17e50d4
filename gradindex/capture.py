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
from .errors import GradIndexError
from .layers import Conv1D, LayerSpec


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
# pass: a (B, T', d_in') is the layer input after ``transform`` (bias column included, zero on padding),
# delta (B, T', d_out) the loss gradient of its output. Only one layer's delta exists at a time. T' is the
# batch's T times r: a layer applied per head (inputs of more than 3 dimensions) or called r times in one
# forward has r positions per token, position c·T + t being head or call c of token t, so summing over T'
# gives the layer's true gradient and ``fold_tokens`` gives each token's share.
LayerFn = Callable[[str, torch.Tensor, torch.Tensor], None]
InputTransform = Callable[[str, torch.Tensor], torch.Tensor]

# One capture at a time in a process: the hooks sit on modules every caller shares (a second thread's
# forward would write into the first one's buffers) and parameter flags are toggled for the duration.
_CAPTURE_LOCK = threading.RLock()


def fold_tokens(per_position: torch.Tensor, width: int) -> torch.Tensor:
    """(…, r·T) per-position values summed to (…, T) per token (see ``LayerFn``)."""
    if per_position.shape[-1] == width:
        return per_position
    return per_position.reshape(*per_position.shape[:-1], -1, width).sum(-2)


def _per_token(name: str, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A layer's input or output gradient as (B, r·T, d): heads moved ahead of the tokens, then flattened."""
    b, t = shape
    if x.dim() == 2 and x.shape[0] == b * t:  # some MLPs flatten (B*T, d) before their linear layers
        return x.reshape(b, t, -1)
    if x.dim() < 3 or tuple(x.shape[:2]) != (b, t):
        raise GradIndexError(
            f"layer {name}: input of shape {tuple(x.shape)} does not start with the batch's (sequences, tokens) = "
            f"({b}, {t}), so its tokens cannot be attributed; leave it out of --modules"
        )
    if x.dim() == 3:
        return x
    return x.reshape(b, t, -1, x.shape[-1]).transpose(1, 2).reshape(b, -1, x.shape[-1])


def _linear_output(name: str, module: nn.Module, x: torch.Tensor, out):
    """The layer's own output. A subclass returning a tuple (MoE routers) is tracked through its first
    element, and only when that element is the linear map of the input (else the gradient would be wrong)."""
    if isinstance(out, torch.Tensor):
        return out
    first = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else None
    if first is not None:
        with torch.no_grad():
            weight = module.weight.T if isinstance(module, Conv1D) else module.weight
            expected = F.linear(x.to(weight.dtype), weight, getattr(module, "bias", None))
        if expected.shape == first.shape and torch.allclose(expected, first.detach(), rtol=1e-3, atol=1e-5):
            return first
    raise GradIndexError(f"layer {name} ({type(module).__name__}) returns {type(out).__name__}, not its linear output; "
                         f"leave it out of --modules")


def _check_finite(name: str, what: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise GradIndexError(f"layer {name}: {bad} non-finite values in its {what} (the model overflows or is NaN "
                             f"in {str(x.dtype).removeprefix('torch.')} on this data; try another --dtype)")


def capture(model: nn.Module, layers: list[LayerSpec], batch: Batch, on_layer: LayerFn, *,
            transform: InputTransform | None = None, sample_seed: int | None = None) -> set[str]:
    """Run ``batch`` through ``model`` and hand each tracked layer's (a, delta) to ``on_layer``.

    Memory is the model's own activations plus each layer's (transformed) inputs until its gradient
    arrives: ``transform`` (e.g. a projection onto a few eigenvectors, LoGra-style) shrinks them at the
    forward pass, and every delta is consumed and dropped inside the backward pass.
    ``sample_seed`` set: the loss uses labels sampled from the model (true Fisher), one generator per
    sequence seeded with ``sample_seed + row``; unset: the batch's own labels.
    Returns the names of the layers the forward called; the others get zeros (their input is unknown).
    """
    modules = dict(model.named_modules())
    mask = batch.attention_mask.bool()
    calls: dict[str, list[torch.Tensor]] = {}  # per layer, each call's (transformed) input
    grads: dict[str, dict[int, torch.Tensor]] = {}  # per layer, the output gradients arrived so far, by call
    handles = []

    def positions_mask(width: int) -> torch.Tensor:
        return mask.repeat(1, width // mask.shape[1]).unsqueeze(-1)

    def deliver(spec: LayerSpec) -> None:
        inputs, arrived = calls.pop(spec.name), grads.pop(spec.name, {})
        deltas = [arrived.get(c) for c in range(len(inputs))]
        deltas = [d if d is not None else torch.zeros(*a.shape[:2], spec.d_out, dtype=a.dtype, device=a.device)
                  for a, d in zip(inputs, deltas)]
        a, delta = (inputs[0], deltas[0]) if len(inputs) == 1 else (torch.cat(inputs, 1), torch.cat(deltas, 1))
        on_layer(spec.name, a, delta)

    def arrive(spec: LayerSpec, call: int, grad: torch.Tensor) -> None:
        g = _per_token(spec.name, grad, mask.shape)
        g = torch.where(positions_mask(g.shape[1]), g, 0).to(calls[spec.name][call].dtype)
        _check_finite(spec.name, "output gradient", g)
        grads.setdefault(spec.name, {})[call] = g
        if len(grads[spec.name]) == len(calls[spec.name]):
            deliver(spec)

    def forward_hook(spec: LayerSpec):
        def keep(module, args, out):
            out = _linear_output(spec.name, module, args[0], out)
            x = _per_token(spec.name, args[0].detach(), mask.shape)
            m = positions_mask(x.shape[1])
            x = torch.where(m, x, 0)  # not x * mask: NaN at padded positions (NaN × 0) must not leak in
            _check_finite(spec.name, "input", x)
            a = torch.cat([x, m.to(x.dtype)], dim=-1) if spec.has_bias else x
            a = a.to(dtype)
            call = len(calls.setdefault(spec.name, []))
            calls[spec.name].append(transform(spec.name, a) if transform is not None else a)
            if out.requires_grad:
                out.register_hook(lambda grad: arrive(spec, call, grad))

        return keep

    device, dtype = device_and_dtype(model)
    called: set[str] = set()
    with _CAPTURE_LOCK:
        try:
            handles = [modules[s.name].register_forward_hook(forward_hook(s)) for s in layers]
            with torch.enable_grad(), _graph_without_parameter_grads(model) as embedded:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                called = set(calls)
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
    for spec in layers:  # outputs the loss does not depend on (zero gradient), layers the forward never called
        if spec.name in calls:
            deliver(spec)
        elif spec.name not in called:
            a = torch.zeros(*mask.shape, spec.d_in, dtype=dtype, device=mask.device)
            on_layer(spec.name, transform(spec.name, a) if transform is not None else a,
                     torch.zeros(*mask.shape, spec.d_out, dtype=dtype, device=mask.device))
    return called
