"""Is the influence true? Counterfactual checks by retraining: the linear datamodeling score and leave-top-k-out.

LDS (Park et al. 2023, TRAK): draw M random subsets S of the training rows, retrain from the same
initialisation by the same recipe on each, and measure each query's log p(completion | prompt). A method's
prediction for S is the sum of its scores over S; the LDS of a query is the Spearman correlation of
predicted and measured over the M subsets. Leave-top-k-out: retrain without a query's k highest-scored rows
and measure how far its log-probability falls (the counterfactual a user means by "these made it say this").

Every retraining is cached by the rows it trained on (``runs/<hash>/``: the measured log-probabilities, and
the weights with ``keep_models``), so a killed run continues where it stopped and a set of rows two methods
both remove is trained once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import TokenizedSet
from .errors import GradIndexError
from .files import atomic_write
from .training import TrainRecipe, log_probs, train

RUNS = "runs"
LOG_PROBS_FILE = "log_probs.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ValidationConfig:
    subsets: int = 20  # M retrainings for the LDS
    fraction: float = 0.5  # of the rows in each subset
    seed: int = 0  # draws the subsets, the random baseline and the bootstrap
    leave_out: tuple[int, ...] = (10, 50, 100)  # k of leave-top-k-out
    leave_out_queries: int | None = None  # leave-top-k-out for the first n queries only (each costs a retraining per method and k)
    keep_models: bool = True  # keep each retrained model's weights beside its measurements
    bootstrap: int = 1000  # resamples of the subsets for the LDS interval

    def __post_init__(self):
        if not isinstance(self.subsets, int) or self.subsets < 3:
            raise GradIndexError(f"--subsets must be at least 3 (a Spearman correlation needs them), got {self.subsets!r}")
        if not 0 < self.fraction < 1:
            raise GradIndexError(f"--fraction must be between 0 and 1, got {self.fraction!r}")
        if any(not isinstance(k, int) or k < 1 for k in self.leave_out):
            raise GradIndexError(f"--leave-out must be positive integers, got {self.leave_out!r}")


class Retrainer:
    """``init`` trained by ``recipe`` on a set of rows of ``train``, once per distinct set; each query's log-probability."""

    def __init__(self, init: nn.Module, train: TokenizedSet, queries: TokenizedSet, recipe: TrainRecipe, folder: str | Path, *,
                 keep_models: bool = True, progress: bool = True):
        self.model, self.train, self.queries, self.recipe = init, train, queries, recipe
        self.initial = {k: v.detach().clone() for k, v in init.state_dict().items()}
        self.folder, self.keep_models, self.progress = Path(folder), keep_models, progress
        self.query_keys = [_query_key(queries, i) for i in range(len(queries))]
        # what every run's key starts from, hashed once (the data's fingerprint reads every token)
        self._base = hashlib.blake2b(self.train.fingerprint().encode() + json.dumps(asdict(recipe), sort_keys=True).encode(), digest_size=10)
        self.trained = 0  # retrainings this process ran (the rest came from the cache)

    def key(self, rows: np.ndarray) -> str:
        h = self._base.copy()
        h.update(np.unique(rows).astype(np.int64).tobytes())
        return h.hexdigest()

    def log_probs(self, rows: np.ndarray, desc: str = "retraining") -> np.ndarray:
        rows = np.unique(rows)
        run = self.folder / RUNS / self.key(rows)
        known = _read_json(run / LOG_PROBS_FILE)
        if all(k in known for k in self.query_keys):
            return np.array([known[k] for k in self.query_keys])
        self.model.load_state_dict(self.initial)
        if (run / WEIGHTS_FILE).is_file():  # new queries on a kept model: measure, do not retrain
            self.model.load_state_dict(load_file(run / WEIGHTS_FILE), strict=False)  # a tied tensor is stored once
        else:
            train(self.model, self.train.subset(rows.tolist()), self.recipe, desc=desc, progress=self.progress)
            self.trained += 1
            if self.keep_models:
                run.mkdir(parents=True, exist_ok=True)
                with atomic_write(run / WEIGHTS_FILE) as tmp:
                    save_file({k: v.detach().contiguous() for k, v in _unshared(self.model).items()}, str(tmp))
        measured = log_probs(self.model, self.queries)
        known.update(zip(self.query_keys, measured.tolist()))
        run.mkdir(parents=True, exist_ok=True)
        with atomic_write(run / LOG_PROBS_FILE) as tmp:
            tmp.write_text(json.dumps({**known, "_rows": len(rows)}))
        return measured


def subset_rows(n: int, config: ValidationConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(config.seed)
    size = max(1, round(config.fraction * n))
    return [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(config.subsets)]


def lds(scores: np.ndarray, subsets: Sequence[np.ndarray], measured: np.ndarray) -> np.ndarray:
    """Per query: Spearman, over the subsets, of the summed scores of each subset's rows and the measured
    log-probability after training on it. ``scores`` (Q, N), ``measured`` (M, Q)."""
    masks = np.zeros((len(subsets), scores.shape[1]))
    for m, rows in enumerate(subsets):
        masks[m, rows] = 1
    predicted = masks @ scores.T.astype(np.float64)  # (M, Q)
    return np.array([_spearman(predicted[:, q], measured[:, q]) for q in range(scores.shape[0])])


def lds_interval(scores: np.ndarray, subsets: Sequence[np.ndarray], measured: np.ndarray, queries: np.ndarray,
                 draws: int, seed: int) -> list[float]:
    """A 95 % bootstrap interval of the mean LDS over ``queries``, resampling the subsets."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(draws):
        pick = rng.integers(0, len(subsets), len(subsets))
        means.append(_mean(lds(scores[queries], [subsets[i] for i in pick], measured[pick][:, queries])))
    means = [m for m in means if m is not None]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))] if len(means) else [None, None]


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Each query's k highest-scored rows (ties by row), (Q, k)."""
    return np.stack([np.lexsort((np.arange(s.shape[0]), -s))[:k] for s in scores])


def validate(retrainer: Retrainer, scores: dict[str, np.ndarray], config: ValidationConfig, *,
             rankings: dict[str, np.ndarray] | None = None, groups: Sequence[str] | None = None,
             reference_log_probs: np.ndarray | None = None) -> dict:
    """LDS of every method in ``scores`` ((Q, N) each) and leave-top-k-out drops of those and of ``rankings``
    ((Q, ≥ max k) rows, best first: e.g. an index's answers, which hold no score for the other rows)."""
    n, n_q = len(retrainer.train), len(retrainer.queries)
    deepest = max(config.leave_out, default=0)
    rankings = {**{m: top_rows(s, deepest) for m, s in scores.items()}, **(rankings or {})}
    if any(r.shape[1] < deepest for r in rankings.values()):
        raise GradIndexError(f"a ranking holds fewer than {deepest} rows per query")
    subsets = subset_rows(n, config)
    measured = np.stack([retrainer.log_probs(rows, f"subset {i + 1}/{len(subsets)}") for i, rows in enumerate(subsets)])
    full = retrainer.log_probs(np.arange(n), "all rows")
    asked = range(n_q if config.leave_out_queries is None else min(n_q, config.leave_out_queries))
    drops: dict[str, dict[int, np.ndarray]] = {m: {k: np.full(n_q, np.nan) for k in config.leave_out} for m in rankings}
    jobs = [(m, k, q) for k in config.leave_out for q in asked for m in rankings]
    for m, k, q in tqdm(jobs, desc="leave-top-k-out", disable=not retrainer.progress, unit="run"):
        kept = np.setdiff1d(np.arange(n), rankings[m][q, :k])
        drops[m][k][q] = full[q] - retrainer.log_probs(kept, f"without {m}'s top {k} of query {q}")[q]
    groups = list(groups) if groups is not None else ["all"] * n_q
    by = {g: np.flatnonzero(np.array(groups) == g) for g in dict.fromkeys(groups)}
    report = {"queries": n_q, "subsets": len(subsets), "fraction": config.fraction, "rows": n, "leave_out_queries": len(asked),
              "full_retrain_vs_model": None if reference_log_probs is None else float(np.max(np.abs(full - reference_log_probs))),
              "retrained_now": retrainer.trained, "preconditioners": {}}
    for m in rankings:
        per_query = lds(scores[m], subsets, measured) if m in scores else None

        def summary(rows: np.ndarray) -> dict:
            out = {}
            if per_query is not None:
                out["lds"] = _mean(per_query[rows])
                out["lds_ci"] = lds_interval(scores[m], subsets, measured, rows, config.bootstrap, config.seed)
            return {**out, **{f"leave_top{k}_out": _mean(drops[m][k][rows]) for k in config.leave_out}}

        entry = {**summary(np.arange(n_q)), "groups": {g: summary(rows) for g, rows in by.items()}}
        if per_query is not None:
            entry["per_query_lds"] = _listed(per_query)
        entry["per_query_leave_out"] = {str(k): _listed(drops[m][k]) for k in config.leave_out}
        report["preconditioners"][m] = entry
    return report


def _mean(values: np.ndarray) -> float | None:
    """The mean of the finite values; None (JSON null) when there are none, e.g. a group no query of which was asked."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [round(float(x), 4) if np.isfinite(x) else None for x in values]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _query_key(queries: TokenizedSet, i: int) -> str:
    h = hashlib.blake2b(queries.input_ids[i].astype(np.int64).tobytes(), digest_size=8)
    h.update(np.packbits(queries.scored[i]).tobytes())
    return h.hexdigest()


def _unshared(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without a second name for a tied tensor (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
