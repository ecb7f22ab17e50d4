"""Training a causal LM by a step-based recipe, bit-reproducibly, and measuring a query's log-probability.

Validation retrains a model many times on subsets of its data and compares what influence predicted with
what happened, so the training must be a function of (initial weights, rows, recipe) alone: a fixed number
of steps (never a wall-clock budget), batches drawn by a seeded generator, no dropout left to chance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import device_and_dtype, summed_nll
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, plan_batches
from .errors import GradIndexError
from .files import atomic_write

RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class TrainRecipe:
    """How a model was trained: AdamW, linear warm-up then cosine decay to ``final_lr_fraction`` of ``lr``,
    gradient clipping, mean next-token loss over batches of ``batch_size`` random sequences."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    final_lr_fraction: float = 0.1
    clip: float = 1.0
    seed: int = 0
    threads: int | None = None  # torch's intra-op threads while training: CPU sums are ordered by them, so the same bits need the same count

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise GradIndexError(f"recipe: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise GradIndexError(f"recipe: lr must be positive, got {self.lr!r}")

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.final_lr_fraction + (1 - self.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RECIPE_FILE
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainRecipe":
        path = Path(path)
        path = path / RECIPE_FILE if path.is_dir() else path
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GradIndexError(f"cannot read the training recipe {path}: {type(e).__name__}: {e}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise GradIndexError(f"{path}: unknown recipe fields {sorted(set(raw) - known) if isinstance(raw, dict) else raw!r}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise GradIndexError(f"{path}: {e}") from None


def batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless random batches of row positions. Sorting by length only within windows of 16 batches of the
    shuffled order keeps batches random while cutting most of the padding."""
    if len(lengths) < batch_size:
        raise GradIndexError(f"{len(lengths)} training sequences, fewer than one batch of {batch_size}")
    window = batch_size * 16
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        plan = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lengths.__getitem__)
            plan += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        for i in torch.randperm(len(plan), generator=generator).tolist():
            yield plan[i]


def train(model: nn.Module, data: TokenizedSet, recipe: TrainRecipe, *, desc: str = "training", progress: bool = True
          ) -> tuple[list[float], torch.optim.Optimizer]:
    """Train ``model`` in place on ``data`` by ``recipe``; returns the loss of every step and the optimizer (its
    Adam second moments are what the ``adam`` preconditioner reads). Same weights, rows and recipe on the same
    machine and thread count: the same bits."""
    device, _ = device_and_dtype(model)
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:  # dropout draws from the global generator: seed it, and give the caller's state back afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(recipe.seed)
            return _steps(model, data, recipe, device, desc, progress)
    finally:
        torch.set_num_threads(threads)


def _steps(model: nn.Module, data: TokenizedSet, recipe: TrainRecipe, device: torch.device, desc: str, progress: bool
           ) -> tuple[list[float], torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    draw = batches([len(x) for x in data.input_ids], recipe.batch_size, torch.Generator().manual_seed(recipe.seed))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress, unit="step", leave=False)
    for _ in bar:
        batch = collate(data, next(draw)).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = summed_nll(logits if logits.dtype == torch.float64 else logits.float(), batch.labels) / (batch.labels[:, 1:] != -100).sum().clamp_min(1)
        loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses, optimizer


@torch.no_grad()
def log_probs(model: nn.Module, queries: TokenizedSet, token_budget: int = DEFAULT_TOKEN_BUDGET) -> np.ndarray:
    """log p(completion | prompt) of each query (its scored tokens), in float64."""
    device, _ = device_and_dtype(model)
    out = np.zeros(len(queries))
    for rows in plan_batches(queries, token_budget):
        batch = collate(queries, rows).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        targets = batch.labels[:, 1:]
        picked = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        out[rows] = (picked * (targets != -100)).sum(-1).cpu().numpy()
    return out
