"""The attribution methods people compare, scored on the same rows and queries: ``training_scores``.

- ``ekfac``: ∇log p(q)ᵀ H⁻¹ ∇log p(z) with H the EK-FAC Fisher (the paper's; gradindex's default).
- ``identity``: the plain gradient dot product (H = I; TracIn at one checkpoint).
- ``cosine``: the gradient cosine (identity, divided by both gradients' norms; GradSim/TracIn-cos).
- ``adam``: the dot product of Adam-normalised gradients, G/√v̂ on both sides (TrackStar's and LESS's
  optimizer-state normaliser), v̂ read from the optimizer's state file.
- ``tfidf``: TF-IDF cosine of the query's text to each training text (the lexical baseline; no gradients).

All are summed over the same tracked layers, so they differ by the preconditioner only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .capture import capture, device_and_dtype
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .errors import GradIndexError
from .factors import Factors
from .layers import LayerSpec
from .lexical import Lexical
from .scores import score_preconditioned, sequence_gradients

PRECONDITIONERS = ("ekfac", "identity", "cosine", "adam", "tfidf")
ADAM_EPS = 1e-8  # AdamW's default ε, added to √v̂ as the optimizer does


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip())
    unknown = [n for n in names if n not in PRECONDITIONERS]
    if unknown or not names:
        raise GradIndexError(f"unknown preconditioner {', '.join(unknown) or '(none given)'}; choose from {', '.join(PRECONDITIONERS)}")
    return names


def check_inputs(methods: Sequence[str], optimizer_state: str | Path | None) -> None:
    """What the methods need, checked before any model or data is loaded."""
    if "adam" in methods and optimizer_state is None:
        raise GradIndexError("adam needs the optimizer's state file (--optimizer-state)")
    if optimizer_state is not None and not Path(optimizer_state).is_file():
        raise GradIndexError(f"cannot read the optimizer state {optimizer_state}: no such file")


def training_scores(method: str, model: nn.Module, layers: list[LayerSpec], train: TokenizedSet, queries: TokenizedSet, *,
                    factors: Factors | None = None, optimizer_state: str | Path | None = None, train_texts: Sequence[str] = (),
                    query_texts: Sequence[str] = (), token_budget: int = DEFAULT_TOKEN_BUDGET, progress: bool = True) -> np.ndarray:
    """(queries, rows) scores of ``method``; higher = the row supports the query's completion more."""
    parse_methods([method])
    if method == "tfidf":
        if len(train_texts) != len(train) or len(query_texts) != len(queries):
            raise GradIndexError("tfidf needs the training texts and the query texts")
        return Lexical.fit(train_texts).similarities(list(query_texts)).astype(np.float32)
    if method == "ekfac":
        if factors is None:
            raise GradIndexError("ekfac needs fitted factors")
        layers = factors.specs
    grads = sequence_gradients(model, layers, queries, token_budget=token_budget)
    if method == "ekfac":
        p = {name: factors.precondition(name, g) for name, g in grads.items()}
    elif method == "adam":
        check_inputs([method], optimizer_state)
        scale = adam_scales(model, layers, optimizer_state)
        p = {name: g / scale[name].to(g) ** 2 for name, g in grads.items()}
    else:
        p = grads
    scores = score_preconditioned(model, layers, p, train, token_budget=token_budget, progress=progress).scores
    if method == "cosine":
        q_norm = np.sqrt(sum((g.double() ** 2).sum((1, 2)) for g in grads.values()).numpy())
        scores = scores / np.maximum(np.outer(q_norm, gradient_norms(model, layers, train, token_budget)), 1e-30)
    return scores.astype(np.float32)


def gradient_norms(model: nn.Module, layers: list[LayerSpec], data: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> np.ndarray:
    """‖∇log p(z)‖ over the tracked layers for every row, one batch and one layer's gradients at a time."""
    device, _ = device_and_dtype(model)
    squares = np.zeros(len(data))
    for rows in plan_batches(data, token_budget):

        def add(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
            squares[rows] += (torch.einsum("bto,bti->boi", delta, a).double() ** 2).sum((1, 2)).cpu().numpy()

        capture(model, layers, collate(data, rows).to(device), add)
    return np.sqrt(squares)


def adam_scales(model: nn.Module, layers: list[LayerSpec], path: str | Path) -> dict[str, torch.Tensor]:
    """√v̂ + ε per tracked layer, (d_out, d_in) like its gradient (bias as the last column), from a
    ``torch.save(optimizer.state_dict())`` of an Adam/AdamW over ``model.parameters()`` in their order."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ids = [i for group in state["param_groups"] for i in group["params"]]
        moments = state["state"]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise GradIndexError(f"cannot read the optimizer state {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    names = [n for n, _ in model.named_parameters()]
    shapes = dict(model.named_parameters())
    if len(ids) != len(names):
        raise GradIndexError(f"{path}: optimizer state for {len(ids)} parameters, the model has {len(names)}")
    position = {n: i for i, n in enumerate(names)}

    def second_moment(name: str) -> torch.Tensor:
        entry = moments.get(position[name], moments.get(str(position[name])))
        if entry is None or "exp_avg_sq" not in entry:
            raise GradIndexError(f"{path}: no Adam second moment (exp_avg_sq) for {name}")
        v = entry["exp_avg_sq"].float()
        if v.shape != shapes[name].shape:
            raise GradIndexError(f"{path}: the state of {name} is {tuple(v.shape)}, the parameter {tuple(shapes[name].shape)}")
        step = float(entry.get("step", 0)) or 1.0
        beta2 = state["param_groups"][0].get("betas", (0.9, 0.999))[1]
        return v / (1 - beta2**step)  # Adam's bias correction, as its update uses

    out = {}
    for spec in layers:
        if spec.expert is not None:
            raise GradIndexError("the adam preconditioner does not support fused expert layers")
        v = second_moment(spec.weight)
        v = v.T if spec.transposed else v
        if spec.has_bias:
            v = torch.cat([v, second_moment(f"{spec.name}.bias")[:, None]], dim=1)
        out[spec.name] = v.sqrt() + ADAM_EPS
    return out
