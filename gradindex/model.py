"""Loading a Hugging Face causal LM once, as one object that knows its tokenizer, padding, context and
fingerprints, so artifacts can be tied to the exact weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .errors import GradIndexError, first_line

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise GradIndexError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(eq=False)
class LanguageModel:
    """A causal LM ready for gradindex: in eval mode, with a tokenizer that pads. Its fingerprints are
    computed once, on first use (hashing the weights of a large model takes a while)."""

    model: nn.Module
    tokenizer: object
    name: str  # where it was loaded from, recorded in artifacts
    adapter: nn.Module | None = None  # the PeftModel ``model`` was unwrapped from: its name is the base model's
    tokenizer_name: str = ""  # where the tokenizer was loaded from, when not with the model (``--tokenizer``)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def context_length(self) -> int | None:
        return context_length(self.model)

    def max_length(self, requested: int | None = None) -> int:
        return resolve_max_length(self.model, requested)

    def save_adapter(self, folder: Path) -> None:
        """The PEFT adapter and tokenizer in ``folder``, where ``from_pretrained`` loads them back onto the base model."""
        self.adapter.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @cached_property
    def model_hash(self) -> str:
        return model_fingerprint(self.model)

    @cached_property
    def tokenizer_hash(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def load_model(model, tokenizer=None, *, dtype: str | None = None, device: str = "cpu") -> LanguageModel:
    """A :class:`LanguageModel` from a local folder or hub name, or from a model object and its tokenizer;
    ``tokenizer`` is an object or where to load one from (default: the model's own)."""
    if isinstance(model, LanguageModel):
        return model
    tokenizer_name = ""
    if isinstance(tokenizer, (str, Path)):
        tokenizer_name, tokenizer = _source_name(tokenizer), load_tokenizer(str(tokenizer))
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise GradIndexError("a model object needs its tokenizer passed too")
        prepare_tokenizer(tokenizer)
        # A PeftModel wraps the transformers model its adapters were injected into; that inner model has the
        # names and weights a saved adapter loads back as (AutoModelForCausalLM on the adapter folder).
        adapter = model if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else None
        inner = model.get_base_model() if adapter is not None else model
        name = getattr(inner.config, "_name_or_path", "") or type(inner).__name__
        return LanguageModel(inner.eval(), tokenizer, name, adapter, tokenizer_name)
    check_device(device)
    local = Path(str(model))
    if not local.exists() and (str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        raise GradIndexError(f"model not found: {model}")
    # The tokenizer first: a missing one is found before minutes of loading weights.
    tokenizer = tokenizer or load_tokenizer(_tokenizer_source(local) if local.is_dir() else str(model))
    module = _from_pretrained(str(model), dtype, device)
    return LanguageModel(module, tokenizer, _source_name(model), tokenizer_name=tokenizer_name)


def _source_name(source) -> str:
    """A local folder is named by its absolute path, so an index opened from another folder finds it."""
    return str(Path(source).resolve()) if Path(str(source)).exists() else str(source)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors with multi-line messages
        raise GradIndexError(f"cannot load tokenizer {name_or_path!r}: {first_line(e)}") from None
    if len(tokenizer) < 2:  # transformers 5 makes an empty one for a model folder without tokenizer files
        raise GradIndexError(f"cannot load tokenizer {name_or_path!r}: no tokenizer files there (an empty vocabulary); pass --tokenizer")
    prepare_tokenizer(tokenizer)
    return tokenizer


def check_device(device: str) -> None:
    """Refuse a device this machine cannot use before anything is loaded onto it."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise GradIndexError(f"unknown device {device!r} ({e})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise GradIndexError(f"device {device!r}: no CUDA GPU is available on this machine (torch {torch.__version__}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise GradIndexError(f"device {device!r}: MPS is not available on this machine; use --device cpu")


def _from_pretrained(name_or_path: str, dtype: str | None, device: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars cover long work; loading a checkpoint is not it
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=parse_dtype(dtype) or "auto")
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors with multi-line messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GradIndexError(f"cannot load model {name_or_path!r}: {first}") from None
    return model.to(device).eval()


def _tokenizer_source(folder: Path) -> str:
    """A PEFT adapter folder saved without its tokenizer uses its base model's."""
    config = folder / "adapter_config.json"
    if config.exists() and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return json.loads(config.read_text()).get("base_model_name_or_path") or str(folder)
    return str(folder)


def prepare_tokenizer(tokenizer) -> None:
    """Padding is masked out everywhere, so any id will do; reuse EOS when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise GradIndexError("tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's config admits, under whichever name its family gives it (MPT: max_seq_len)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(model: nn.Module, max_length: int | None) -> int:
    """The user's ``max_length``, refused when it exceeds the model's context; else the context (capped at 2048)."""
    context = context_length(model)
    if max_length is None:
        return min(context or 2048, 2048)
    if max_length < 2:
        raise GradIndexError(f"max length must be at least 2 tokens, got {max_length}")
    if context is not None and max_length > context:
        raise GradIndexError(f"max length {max_length} exceeds the model's context of {context} tokens")
    return max_length


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every weight's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: what decides the ids a text becomes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()
