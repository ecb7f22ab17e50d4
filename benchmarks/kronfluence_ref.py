"""kronfluence as an independent reference for gradindex (tests and benchmarks only).

Nothing here is used by ``gradindex`` itself, and no kronfluence code is copied into it: this module
only drives kronfluence's public API on the same model, the same tokenized data and the same losses,
so its factors and scores can be compared with gradindex's.

- :func:`linearize` swaps GPT-2's ``Conv1D`` for ``nn.Linear`` (kronfluence tracks ``nn.Linear`` only);
- :class:`CausalLMTask` is the kronfluence ``Task``: summed next-token NLL over the scored tokens
  (labels sampled from the model for the true Fisher), and the same sum as the query measurement;
- :class:`TokenizedDataset` turns a gradindex :class:`TokenizedSet` into padded
  ``{input_ids, attention_mask, labels}`` rows, labels in gradindex's unshifted convention;
- :func:`kronfluence_fit`, :func:`kronfluence_scores` run ``fit_all_factors`` (EK-FAC) and
  ``compute_pairwise_scores`` (damping 0.1 × mean Λ);
- :func:`factors_from_kronfluence` loads kronfluence's saved factors into a gradindex :class:`Factors`.

It also holds the small fixtures the test and the benchmark share: a learnable toy corpus and a
few-second training loop for the tiny models of ``tests/tiny.py``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from gradindex.capture import sample_labels
from gradindex.data import TokenizedSet
from gradindex.factors import Factors, FitConfig, LayerFactors
from gradindex.layers import LayerSpec

try:  # transformers moved Conv1D around between releases.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs

__all__ = [
    "CausalLMTask", "TokenizedDataset", "factors_from_kronfluence", "kronfluence_fit", "kronfluence_scores",
    "linearize", "markov_texts", "train_briefly",
]


# --------------------------------------------------------------------------------------------------
# Model


def linearize(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every transformers ``Conv1D`` replaced by an equivalent ``nn.Linear``.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` stored (d_in, d_out); the ``nn.Linear`` gets ``Wᵀ``, so
    outputs are identical and module names unchanged. Tied weights stay tied (deepcopy keeps sharing).
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


# --------------------------------------------------------------------------------------------------
# Task and data


def _shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over scored positions of -log p(labels[:, t] | tokens < t); labels are not pre-shifted."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


class CausalLMTask(Task):
    """Summed next-token NLL as both the training loss and the query measurement.

    ``compute_train_loss(sample=True)`` replaces every scored label by a draw from the model's own
    softmax (true Fisher). By default the draws use torch's global generator, i.e. a label sample
    independent of gradindex's. With ``row_seed`` set, each sequence uses its own generator seeded
    with ``row_seed + row`` exactly as gradindex's ``sample_labels`` does, so both tools see the same
    sampled labels (a diagnostic that removes the sampling noise from a comparison).
    """

    def __init__(self, module_names: Sequence[str], row_seed: int | None = None):
        self.module_names = list(module_names)
        self.row_seed = row_seed

    def _logits(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def _sample(self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if self.row_seed is not None and rows is not None:
            return sample_labels(logits, labels, [self.row_seed + int(r) for r in rows.tolist()])
        sampled = torch.full_like(labels, -100)
        scored = labels[:, 1:] != -100
        if scored.any():
            probs = torch.softmax(logits[:, :-1][scored].detach().float(), dim=-1)
            sampled[:, 1:][scored] = torch.multinomial(probs, 1).squeeze(-1)
        return sampled

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = self._logits(batch, model)
        labels = batch["labels"]
        if sample:
            labels = self._sample(logits, labels, batch.get("row"))
        return _shifted_nll(logits, labels)

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return _shifted_nll(self._logits(batch, model), batch["labels"])

    def get_influence_tracked_modules(self) -> list[str]:
        return self.module_names

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


class TokenizedDataset(Dataset):
    """A gradindex :class:`TokenizedSet` as fixed-length, right-padded rows for a torch DataLoader.

    Each item is ``{input_ids, attention_mask, labels, row}`` of length ``length`` (default: the longest
    sequence); ``labels[t]`` is the target predicted from position t-1, -100 on padding and on unscored
    positions (the first token of a text, a query's prompt) — gradindex's ``Batch.labels`` convention.
    ``order`` optionally permutes the rows (item i is sequence ``order[i]``; ``row`` keeps the original index).
    """

    def __init__(self, data: TokenizedSet, pad_id: int, length: int | None = None, order: Sequence[int] | None = None):
        self.data = data
        self.pad_id = pad_id
        self.length = length or max(len(x) for x in data.input_ids)
        self.order = list(range(len(data))) if order is None else list(order)
        if max(len(data.input_ids[r]) for r in self.order) > self.length:
            raise ValueError(f"a sequence is longer than the padded length {self.length}")

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.order[i]
        ids = torch.from_numpy(self.data.input_ids[r]).long()
        n = len(ids)
        input_ids = torch.full((self.length,), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(self.length, dtype=torch.long)
        labels = torch.full((self.length,), -100, dtype=torch.long)
        input_ids[:n] = ids
        attention_mask[:n] = 1
        labels[:n] = torch.where(torch.from_numpy(self.data.scored[r]), ids, torch.tensor(-100))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "row": torch.tensor(r)}


def trim_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Default collation, then drop the trailing columns that are padding in every row of the batch.

    Right padding never influences earlier positions of a causal LM, so this changes no loss or
    gradient; it only spares kronfluence the work on all-padding columns.
    """
    batch = default_collate(items)
    width = max(int(batch["attention_mask"].sum(1).max()), 1)
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}


def length_order(data: TokenizedSet) -> list[int]:
    """Rows longest first (stable), the order gradindex's batch planner uses."""
    return sorted(range(len(data)), key=lambda r: -len(data.input_ids[r]))


# --------------------------------------------------------------------------------------------------
# Running kronfluence


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def factor_arguments(dtype: torch.dtype = torch.float32, empirical: bool = False) -> FactorArguments:
    return FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=empirical,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )


def score_arguments(dtype: torch.dtype = torch.float32, damping_factor: float | None = None) -> ScoreArguments:
    return ScoreArguments(
        damping_factor=damping_factor,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        query_gradient_svd_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
    )


def make_analyzer(
    model: nn.Module,
    module_names: Sequence[str],
    out_dir: str | Path,
    *,
    analysis_name: str = "kronfluence_ref",
    row_seed: int | None = None,
) -> Analyzer:
    """A CPU kronfluence ``Analyzer`` over a linearized copy of ``model`` (the original is left untouched)."""
    task = CausalLMTask(module_names, row_seed=row_seed)
    prepared = prepare_model(linearize(model).eval(), task)
    return Analyzer(
        analysis_name=analysis_name, model=prepared, task=task, cpu=True, disable_tqdm=True,
        output_dir=str(out_dir), log_level=logging.WARNING,
    )


def kronfluence_fit(
    model: nn.Module,
    module_names: Sequence[str],
    train_set: TokenizedSet,
    pad_id: int,
    out_dir: str | Path,
    batch_size: int,
    *,
    factors_name: str = "ekfac",
    seed: int = 0,
    row_seed: int | None = None,
    empirical: bool = False,
    dtype: torch.dtype | None = None,
    trim: bool = True,
    sort_by_length: bool = True,
    length: int | None = None,
    analyzer: Analyzer | None = None,
) -> Analyzer:
    """Fit EK-FAC factors with kronfluence's ``fit_all_factors`` and return the ``Analyzer`` holding them.

    ``dtype`` (default: the model's) is used for every covariance, per-sample gradient and Λ;
    eigendecompositions are float64. ``seed`` seeds torch's global generator for the label sample
    (``row_seed`` instead draws gradindex's exact labels, see :class:`CausalLMTask`).
    ``trim``/``sort_by_length`` let kronfluence skip all-padding columns like gradindex does; with both
    off it sees every row padded to ``length``. Batches hold ``batch_size`` sequences.
    ``analyzer`` reuses one made by :func:`make_analyzer` (``out_dir`` is then unused).
    """
    dtype = dtype or _model_dtype(model)
    if analyzer is None:
        analyzer = make_analyzer(model, module_names, out_dir, row_seed=row_seed)
    dataset = TokenizedDataset(train_set, pad_id, length, order=length_order(train_set) if sort_by_length else None)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=trim_collate if trim else default_collate))
    torch.manual_seed(seed)
    analyzer.fit_all_factors(
        factors_name=factors_name,
        dataset=dataset,
        per_device_batch_size=batch_size,
        factor_args=factor_arguments(dtype, empirical),
        overwrite_output_dir=True,
    )
    return analyzer


def kronfluence_scores(
    analyzer: Analyzer,
    train_set: TokenizedSet,
    query_set: TokenizedSet,
    pad_id: int,
    *,
    factors_name: str = "ekfac",
    scores_name: str = "pairwise",
    train_batch_size: int = 64,
    query_batch_size: int | None = None,
    damping_factor: float | None = None,
    dtype: torch.dtype | None = None,
    trim: bool = True,
    sort_by_length: bool = True,
    length: int | None = None,
) -> np.ndarray:
    """kronfluence's ``compute_pairwise_scores`` as a float64 array ``(n_query, n_train)`` in the sets' row order.

    ``damping_factor=None`` is kronfluence's 0.1 × mean(Λ) heuristic, gradindex's default.
    """
    dtype = dtype or _model_dtype(analyzer.model)
    order = length_order(train_set) if sort_by_length else list(range(len(train_set)))
    train_ds = TokenizedDataset(train_set, pad_id, length, order=order)
    query_ds = TokenizedDataset(query_set, pad_id)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=trim_collate if trim else default_collate))
    analyzer.compute_pairwise_scores(
        scores_name=scores_name,
        factors_name=factors_name,
        query_dataset=query_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=query_batch_size or len(query_set),
        per_device_train_batch_size=train_batch_size,
        score_args=score_arguments(dtype, damping_factor),
        overwrite_output_dir=True,
    )
    permuted = analyzer.load_pairwise_scores(scores_name)["all_modules"].double().numpy()
    scores = np.empty_like(permuted)
    scores[:, order] = permuted
    return scores


def factors_from_kronfluence(
    analyzer: Analyzer,
    factors_name: str,
    specs: Sequence[LayerSpec],
    *,
    train_set: TokenizedSet | None = None,
    describe: dict | None = None,
) -> Factors:
    """kronfluence's saved EK-FAC factors as a gradindex :class:`Factors` (Λ = lambda_matrix / num_lambda_processed).

    Tensors keep kronfluence's dtype. ``describe`` fills provenance fields of the :class:`FitConfig`
    (e.g. ``model_hash``/``tokenizer_hash`` so that ``Factors.check_model`` passes).
    """
    loaded = analyzer.load_all_factors(factors_name=factors_name)
    layers = {}
    for spec in specs:
        lam = loaded["lambda_matrix"][spec.name].double() / loaded["num_lambda_processed"][spec.name].double()
        q_a = loaded["activation_eigenvectors"][spec.name]
        q_s = loaded["gradient_eigenvectors"][spec.name]
        if lam.shape != (spec.d_out, spec.d_in) or q_a.shape != (spec.d_in, spec.d_in) or q_s.shape != (spec.d_out, spec.d_out):
            raise ValueError(f"{spec.name}: kronfluence shapes {tuple(lam.shape)} do not match {spec}")
        layers[spec.name] = LayerFactors(
            q_a=q_a,
            q_s=q_s,
            lam=lam.to(q_a.dtype),
            a_eigvals=loaded["activation_eigenvalues"][spec.name],
            s_eigvals=loaded["gradient_eigenvalues"][spec.name],
        )
    dtype = next(iter(layers.values())).q_a.dtype if layers else torch.float32
    factor_args = analyzer.load_factor_args(factors_name)
    config = FitConfig(
        layers=[asdict(s) for s in specs],
        n_sequences=len(train_set) if train_set is not None else 0,
        n_tokens=train_set.n_tokens if train_set is not None else 0,
        n_truncated=train_set.n_truncated if train_set is not None else 0,
        data_hash=train_set.fingerprint() if train_set is not None else "",
        fisher="empirical" if getattr(factor_args, "use_empirical_fisher", False) else "true",
        compute_dtype=str(dtype).removeprefix("torch."),
        factor_dtype=str(dtype).removeprefix("torch."),
        **(describe or {}),
    )
    return Factors(layers, config)


# --------------------------------------------------------------------------------------------------
# Fixtures shared by the test and the benchmark


def markov_texts(
    words: Sequence[str], n: int, *, seed: int = 0, chain_seed: int = 0, branching: int = 3, lo: int = 4, hi: int = 16
) -> list[str]:
    """``n`` texts from a sparse random bigram chain over ``words`` (learnable in a few hundred steps).

    ``chain_seed`` fixes the chain (the "language"), ``seed`` the texts drawn from it.
    """
    c = np.random.default_rng(chain_seed)
    words = list(dict.fromkeys(words))
    successors = [c.choice(len(words), size=branching, replace=False) for _ in words]
    weights = c.dirichlet(np.ones(branching), size=len(words))
    g = np.random.default_rng([chain_seed, seed])
    out = []
    for _ in range(n):
        length = int(g.integers(lo, hi))
        w = int(g.integers(len(words)))
        seq = [w]
        for _ in range(length - 1):
            w = int(successors[w][g.choice(branching, p=weights[w])])
            seq.append(w)
        out.append(" ".join(words[i] for i in seq))
    return out


def train_briefly(
    model: nn.Module, data: TokenizedSet, *, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """A few hundred AdamW steps of next-token training on ``data`` (mean token loss, padded with its
    ``pad_id``); returns the losses."""
    from gradindex.data import collate

    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch_size,), generator=g).tolist()
        batch = collate(data, rows)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        n = (batch.labels[:, 1:] != -100).sum().clamp(min=1)
        loss = _shifted_nll(logits, batch.labels) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
