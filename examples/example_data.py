"""Offline data and model for the gradindex example.

A tiny GPT-2 is trained from scratch on docstring paragraphs from the Python
standard library (PSF licence, always present, no download) into which the
sentences of ``planted_facts.jsonl`` are shuffled. The facts are about
invented entities, so the model can only know them from those training
sequences, which is what an influence search should then recover.

Every training template states a fact subject-first; the reverse queries ask
for the subject given the object, a direction never seen in training.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from gradindex.data import tokenize_texts  # noqa: E402
from gradindex.training import TrainRecipe, train  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent
FACTS_PATH = EXAMPLES_DIR / "planted_facts.jsonl"
DEFAULT_CACHE_DIR = EXAMPLES_DIR / ".cache"
EOT = "<|endoftext|>"
# Bump when the cache layout or the preparation procedure changes.
FORMAT_VERSION = 2  # 2: step-based training by gradindex.training; init/, recipe.json, optimizer.pt kept

_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})
_MIN_PARAGRAPH_CHARS = 80
_MAX_PARAGRAPH_CHARS = 600


@dataclass(frozen=True)
class ExampleConfig:
    name: str
    corpus_paragraphs: int
    fact_repeats: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    max_length: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    seed: int

    def recipe(self) -> TrainRecipe:
        """The training schedule, step-based: a slower machine trains the same model, only later."""
        return TrainRecipe(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, seed=self.seed)


# Each fact sentence is repeated 5 times: with 2 copies the full model, in its
# 1,300 steps, learned which objects belong to a relation but mostly not which
# subject goes with which (first-token argmax ~30% instead of ~60%).
FULL = ExampleConfig(
    name="full",
    corpus_paragraphs=3000,
    fact_repeats=5,
    vocab_size=4096,
    n_layer=4,
    n_head=4,
    n_embd=128,
    n_positions=128,
    max_length=64,
    batch_size=16,
    steps=1300,
    lr=2e-3,
    warmup_steps=30,
    weight_decay=0.01,
    seed=0,
)

QUICK = ExampleConfig(
    name="quick",
    corpus_paragraphs=400,
    fact_repeats=5,
    vocab_size=2048,
    n_layer=2,
    n_head=2,
    n_embd=64,
    n_positions=128,
    max_length=64,
    batch_size=16,
    steps=1000,
    lr=5e-3,
    warmup_steps=30,
    weight_decay=0.01,
    seed=0,
)


@dataclass(frozen=True)
class ExampleArtifacts:
    model_dir: Path
    """Model and tokenizer; load with ``AutoModelForCausalLM`` / ``AutoTokenizer``."""
    train_path: Path
    """JSONL, one ``{"text": ...}`` per training sequence, in training order."""
    queries_path: Path
    """JSONL of ``{"prompt", "completion", "fact_id"}``, subject -> object."""
    reverse_queries_path: Path
    """Same, object -> subject (never stated that way in training)."""
    max_length: int
    """Training sequences were truncated to this many tokens."""
    init_dir: Path
    """The weights before training (same config and tokenizer): what ``gradindex validate`` retrains from."""
    recipe_path: Path
    """The training schedule (``gradindex.training.TrainRecipe``)."""
    optimizer_path: Path
    """AdamW's state at the end of training (``torch.load``; the ``adam`` preconditioner reads it)."""


def prepare_example(cache_dir: str | Path = DEFAULT_CACHE_DIR, quick: bool = False) -> ExampleArtifacts:
    """Build (or reuse from ``cache_dir``) the example model, tokenizer and data."""
    cfg = QUICK if quick else FULL
    cache_dir = Path(cache_dir)
    final_dir = cache_dir / cfg.name
    settings = _settings(cfg)
    if _is_complete(final_dir, settings):
        _log(f"reusing cached example in {final_dir}")
        return _artifacts(final_dir, cfg)

    build_into_place(final_dir, lambda work_dir: _build(cfg, settings, work_dir), lambda: _is_complete(final_dir, settings))
    return _artifacts(final_dir, cfg)


def build_into_place(final_dir: Path, build: Callable[[Path], None], is_complete: Callable[[], bool]) -> None:
    """Run ``build`` in a scratch directory beside ``final_dir`` and rename it into place at the end, so an
    interrupted run never leaves a cache that looks complete."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=final_dir.parent))
    try:
        build(work_dir)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        try:
            work_dir.rename(final_dir)
        except OSError:
            # Another process finished the same build first.
            if not is_complete():
                raise
            shutil.rmtree(work_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise


def load_facts(path: Path = FACTS_PATH) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stdlib_paragraphs() -> list[str]:
    """Distinct, whitespace-normalised docstring paragraphs of 80-600 characters, sorted."""
    paragraphs = {
        paragraph
        for docstring in stdlib_docstrings()
        for paragraph in split_paragraphs(docstring)
        if _MIN_PARAGRAPH_CHARS <= len(paragraph) <= _MAX_PARAGRAPH_CHARS
    }
    return sorted(paragraphs)


def stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the standard library's own code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. invalid escape sequences
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    yield docstring


def split_paragraphs(text: str) -> list[str]:
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    # Doctest blocks are code, not prose.
    return [p for p in paragraphs if p and ">>>" not in p]


def _build(cfg: ExampleConfig, settings: dict[str, Any], out_dir: Path) -> None:
    started = time.monotonic()
    facts = load_facts()
    paragraphs = stdlib_paragraphs()
    _log(f"[{cfg.name}] stdlib provides {len(paragraphs)} distinct paragraphs")
    texts = _training_texts(cfg, paragraphs, facts)
    _log(f"[{cfg.name}] {len(texts)} training sequences")

    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.n_positions)
    _log(f"[{cfg.name}] tokenizer vocabulary: {len(tokenizer)}")
    queries = [{"prompt": f["prompt"], "completion": f["completion"], "fact_id": f["id"]} for f in facts]
    reverse_queries = [
        {"prompt": f["reverse_prompt"], "completion": f["reverse_completion"], "fact_id": f["id"]}
        for f in facts
    ]

    with _torch_threads(_num_threads()):
        init = initial_model(cfg, tokenizer)
        init.save_pretrained(out_dir / "init")
        tokenizer.save_pretrained(out_dir / "init")
        model, train_stats, optimizer = train_model(cfg, tokenizer, texts, init)
        results = {
            "num_train_sequences": len(texts),
            "num_stdlib_paragraphs": len(paragraphs),
            "vocab_size": len(tokenizer),
            **train_stats,
            "train_set_loss": round(_mean_loss(model, tokenizer, texts, cfg), 4),
            "forward": evaluate_queries(model, tokenizer, queries),
            "reverse": evaluate_queries(model, tokenizer, reverse_queries),
        }
    _log(f"[{cfg.name}] loss over the training set: {results['train_set_loss']:.3f}")
    for direction in ("forward", "reverse"):
        m = results[direction]
        _log(
            f"[{cfg.name}] {direction} facts: argmax {m['first_token_argmax']:.0%}, "
            f"top-5 {m['first_token_top5']:.0%}, mean completion log-prob {m['mean_logprob']:.2f}"
        )

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    replace(cfg.recipe(), threads=_num_threads()).save(out_dir)  # the thread count it trained with: retraining reproduces its bits
    torch.save(optimizer.state_dict(), out_dir / "optimizer.pt")
    _write_jsonl(out_dir / "train.jsonl", ({"text": t} for t in texts))
    _write_jsonl(out_dir / "queries.jsonl", queries)
    _write_jsonl(out_dir / "reverse_queries.jsonl", reverse_queries)
    results["prepare_seconds"] = round(time.monotonic() - started, 1)
    # meta.json is written last: its presence marks the directory as complete.
    (out_dir / "meta.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))


def _training_texts(cfg: ExampleConfig, paragraphs: list[str], facts: list[dict[str, Any]]) -> list[str]:
    rng = random.Random(cfg.seed)
    corpus = rng.sample(paragraphs, min(cfg.corpus_paragraphs, len(paragraphs)))
    fact_texts = [t for fact in facts for t in fact["templates"]] * cfg.fact_repeats
    texts = corpus + fact_texts
    rng.shuffle(texts)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: spaces attach to the following word, no added tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
    )


def initial_model(cfg: ExampleConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            # No dropout: the model should memorise, and its gradients should be deterministic.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # transformers cannot infer the loss from this class name and warns on every run.
    model.loss_type = "ForCausalLM"
    return model


def train_model(cfg: ExampleConfig, tokenizer: PreTrainedTokenizerFast, texts: list[str], model: GPT2LMHeadModel
                ) -> tuple[GPT2LMHeadModel, dict[str, Any], torch.optim.Optimizer]:
    """``cfg.recipe()`` applied to ``model`` by the library's trainer: what ``gradindex validate`` repeats on subsets."""
    started = time.monotonic()
    recipe = replace(cfg.recipe(), threads=torch.get_num_threads())  # the caller's thread count, recorded
    losses, optimizer = train(model, tokenize_texts(tokenizer, texts, cfg.max_length), recipe, desc=f"[{cfg.name}] training")
    tail = losses[-max(1, len(losses) // 20) :]
    _log(f"[{cfg.name}] {len(losses)} steps, final loss {sum(tail) / len(tail):.3f}")
    return model, {
        "train_seconds": round(time.monotonic() - started, 1),
        "steps": len(losses),
        "final_train_loss": round(sum(tail) / len(tail), 4),
    }, optimizer


@torch.no_grad()
def evaluate_queries(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, queries: list[dict[str, str]]
) -> dict[str, float]:
    """How well the model predicts each completion after its prompt."""
    argmax_hits = top5_hits = 0
    logprobs: list[float] = []
    for query in queries:
        prompt_ids = tokenizer(query["prompt"])["input_ids"]
        completion_ids = tokenizer(query["completion"])["input_ids"]
        # Scoring prompt and completion separately is only valid if they tokenize independently.
        if prompt_ids + completion_ids != tokenizer(query["prompt"] + query["completion"])["input_ids"]:
            raise ValueError(f"prompt/completion boundary splits a token: {query}")
        ids = torch.tensor([prompt_ids + completion_ids])
        log_probs = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(completion_ids)
        logprobs.append(log_probs.gather(1, targets[:, None]).sum().item())
        first = log_probs[0]
        argmax_hits += int(first.argmax().item() == completion_ids[0])
        top5_hits += int(completion_ids[0] in first.topk(5).indices.tolist())
    n = len(queries)
    return {
        "first_token_argmax": round(argmax_hits / n, 4),
        "first_token_top5": round(top5_hits / n, 4),
        "mean_logprob": round(sum(logprobs) / n, 4),
    }


@torch.no_grad()
def _mean_loss(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, texts: list[str], cfg: ExampleConfig
) -> float:
    encoded = _encode(tokenizer, texts, cfg.max_length)
    total = tokens = 0.0
    for start in range(0, len(encoded), 64):
        input_ids, attention_mask, labels = _collate(encoded[start : start + 64], tokenizer.pad_token_id)
        n = (labels[:, 1:] != -100).sum().item()
        total += model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item() * n
        tokens += n
    return total / tokens


def _encode(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def _collate(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), pad_id)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _num_threads() -> int:
    """Half the usable CPUs.

    Intra-op threads that outnumber the idle cores stall on each other: on a
    2-core machine shared with one other busy process, 2 threads ran a step
    about 10x slower than 1 thread did.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // 2)


def _settings(cfg: ExampleConfig) -> dict[str, Any]:
    """Everything the cached artifacts depend on; a mismatch forces a rebuild."""
    return {
        "format_version": FORMAT_VERSION,
        **asdict(cfg),
        "facts_sha256": hashlib.sha256(FACTS_PATH.read_bytes()).hexdigest(),
        # The corpus is drawn from the running interpreter's standard library.
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _is_complete(directory: Path, settings: dict[str, Any]) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    required = [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
        "init/model.safetensors",
        "recipe.json",
        "optimizer.pt",
        "train.jsonl",
        "queries.jsonl",
        "reverse_queries.jsonl",
    ]
    return meta.get("settings") == settings and all((directory / name).is_file() for name in required)


def _artifacts(directory: Path, cfg: ExampleConfig) -> ExampleArtifacts:
    return ExampleArtifacts(
        model_dir=directory / "model",
        train_path=directory / "train.jsonl",
        queries_path=directory / "queries.jsonl",
        reverse_queries_path=directory / "reverse_queries.jsonl",
        max_length=cfg.max_length,
        init_dir=directory / "init",
        recipe_path=directory / "recipe.json",
        optimizer_path=directory / "optimizer.pt",
    )


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--quick", action="store_true", help="small model for automated tests")
    args = parser.parse_args()
    artifacts = prepare_example(args.cache_dir, quick=args.quick)
    results = json.loads((artifacts.model_dir.parent / "meta.json").read_text())["results"]
    for field, value in asdict(artifacts).items():
        print(f"{field}: {value}")
    print(f"training time: {results['train_seconds']}s ({results['steps']} steps)")
