"""Per-token inputs and output gradients of the tracked layers, captured with hooks.

Modules are never replaced (a fused experts module runs its experts one at a time for the duration, see
``experts``): a forward hook keeps each tracked layer's input, a tensor hook on its output
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
from .experts import forward_by_expert
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
    Returns the names of the layers the forward called (experts: that tokens were routed to); the others get
    zeros (their input is unknown).
    """
    modules = dict(model.named_modules())
    mask = batch.attention_mask.bool()
    flat_mask = mask.reshape(-1, 1)
    # Per layer, each call's (transformed) input, with the token rows it holds (an expert sees only the tokens
    # routed to it: its rows are kept compact until delivery, not as (B, T, d) mostly zeros), and the output
    # gradients arrived so far, by call.
    calls: dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}
    grads: dict[str, dict[int, torch.Tensor]] = {}
    handles = []

    def positions_mask(width: int) -> torch.Tensor:
        return mask.repeat(1, width // mask.shape[1]).unsqueeze(-1)

    def dense(rows: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return x
        return x.new_zeros(mask.numel(), x.shape[-1]).index_copy_(0, rows, x).view(*mask.shape, -1)

    def deliver(spec: LayerSpec) -> None:
        inputs, arrived = calls.pop(spec.name), grads.pop(spec.name, {})
        a = [dense(rows, x) for rows, x in inputs]
        deltas = [dense(rows, arrived[c]) if c in arrived else torch.zeros(*x.shape[:2], spec.d_out, dtype=x.dtype, device=x.device)
                  for c, ((rows, _), x) in enumerate(zip(inputs, a))]
        on_layer(spec.name, *((a[0], deltas[0]) if len(a) == 1 else (torch.cat(a, 1), torch.cat(deltas, 1))))

    def arrive(spec: LayerSpec, call: int, grad: torch.Tensor) -> None:
        rows = calls[spec.name][call][0]
        g = _per_token(spec.name, grad, mask.shape) if rows is None else grad
        g = torch.where(positions_mask(g.shape[1]) if rows is None else flat_mask[rows], g, 0)
        g = g.to(calls[spec.name][call][1].dtype)
        _check_finite(spec.name, "output gradient", g)
        grads.setdefault(spec.name, {})[call] = g
        if len(grads[spec.name]) == len(calls[spec.name]):
            deliver(spec)

    def keep(spec: LayerSpec, x: torch.Tensor, valid: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None = None):
        """Keep a call's input x (tokens, d_in) for the backward pass; ``valid`` marks its unpadded tokens."""
        x = torch.where(valid, x, 0)  # not x * mask: NaN at padded positions (NaN × 0) must not leak in
        _check_finite(spec.name, "input", x)
        a = (torch.cat([x, valid.to(x.dtype)], dim=-1) if spec.has_bias else x).to(dtype)
        call = len(calls.setdefault(spec.name, []))
        calls[spec.name].append((rows, transform(spec.name, a) if transform is not None else a))
        if out.requires_grad:
            out.register_hook(lambda grad: arrive(spec, call, grad))

    def forward_hook(spec: LayerSpec):
        def hook(module, args, out):
            out = _linear_output(spec.name, module, args[0], out)
            x = _per_token(spec.name, args[0].detach(), mask.shape)
            keep(spec, x, positions_mask(x.shape[1]), out)

        return hook

    def by_expert(name: str, experts: dict[tuple[str, int], LayerSpec]):
        def track(proj: str, e: int, rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if (spec := experts.get((proj, e))) is not None:
                keep(spec, x.detach(), flat_mask[rows], out, rows)
            return out

        def forward(hidden_states, *routing, **named):
            if hidden_states.shape[:-1].numel() != mask.numel():
                raise GradIndexError(f"experts {name}: input of shape {tuple(hidden_states.shape)} does not hold the batch's "
                                     f"{tuple(mask.shape)} tokens, so they cannot be attributed; leave it out of --modules")
            return forward_by_expert(modules[name], track, hidden_states, *routing, **named)

        return forward

    by_module: dict[str, dict[tuple[str, int], LayerSpec]] = {}
    for s in layers:
        if s.expert is not None:
            by_module.setdefault(s.module, {})[(s.projection, s.expert)] = s
    device, dtype = device_and_dtype(model)
    called: set[str] = set()
    with _CAPTURE_LOCK:
        patched = {name: vars(modules[name]).get("forward") for name in by_module}
        try:
            handles = [modules[s.name].register_forward_hook(forward_hook(s)) for s in layers if s.expert is None]
            for name, experts in by_module.items():  # an instance attribute, removed below: the class is untouched
                modules[name].forward = by_expert(name, experts)
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
            for name, previous in patched.items():
                vars(modules[name]).pop("forward", None)
                if previous is not None:
                    modules[name].forward = previous
    # Outputs the loss does not depend on (zero gradient); layers the forward never called, and experts no
    # token of this batch was routed to: zeros.
    for spec in layers:
        if spec.name in calls:
            deliver(spec)
        elif spec.name not in called:
            a = torch.zeros(*mask.shape, spec.d_in, dtype=dtype, device=mask.device)
            on_layer(spec.name, transform(spec.name, a) if transform is not None else a,
                     torch.zeros(*mask.shape, spec.d_out, dtype=dtype, device=mask.device))
    return called
