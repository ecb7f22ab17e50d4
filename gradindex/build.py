"""The offline builder: training gradients → whitened, compressed shards → FAISS index + manifest.

A build is a grid of fixed row ranges (shards). Each shard is computed and written atomically with
a record marking it complete, so a killed build re-run with the same arguments skips what is done
and ends with exactly the rows of an uninterrupted build. ``shard=(i, n)`` (or ``torchrun``) builds
the shards j ≡ i (mod n); ``merge`` joins parts and writes the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from . import __version__, ann
from .capture import capture, device_and_dtype
from .compress import CompressionConfig, Compressor
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, collate, load_texts, plan_batches, tokenize_texts
from .errors import GradIndexError
from .factors import CONFIG_FILE, FACTORS_FILE, Factors, rotated_sequence_gradients
from .lexical import LEXICAL_DIR, Lexical
from .model import model_fingerprint, resolve_max_length, tokenizer_fingerprint
from .store import (
    BUILD_CONFIG, FACTORS_DIR, INDEX_FILE, MANIFEST, SCHEMA_VERSION, BuildConfig, atomic_save_npy, atomic_write_text,
    config_differences, file_entry, load_build_config, read_record, save_build_config, sha256, shard_path, shard_texts,
    write_record,
)

DEFAULT_SHARD_SIZE = 4096


def build(
    model,
    data,
    out: str | Path,
    *,
    factors: Factors | str | Path | None = None,
    tokenizer=None,
    text_field: str = "text",
    max_length: int | None = None,
    modules: str = "mlp",
    compression: CompressionConfig | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard: tuple[int, int] | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_memory: int = ann.DEFAULT_MAX_MEMORY,
    index_key: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Build (or resume) the index of ``data`` under ``out``; with ``shard=(i, n)`` only part i of n.

    Without ``factors`` they are fitted on ``data`` first (and reused when resuming).
    """
    from .pipeline import fit, model_and_tokenizer

    out = Path(out)
    compression = compression or CompressionConfig()
    if shard_size <= 0:
        raise GradIndexError(f"shard size must be positive, got {shard_size}")
    distributed = shard is None and _torchrun_part()
    if distributed:
        shard = distributed
        if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise GradIndexError(f"shard must be i/n with 0 <= i < n, got {shard[0]}/{shard[1]}")
    model, tokenizer, model_name = model_and_tokenizer(model, tokenizer, dtype, device)
    dataset = load_texts(data, text_field=text_field)
    if len(dataset) == 0:
        raise GradIndexError(f"data {data} has no rows")
    leader = shard is None or shard[0] == 0 or not distributed

    factors_dir = out / FACTORS_DIR
    if leader:
        out.mkdir(parents=True, exist_ok=True)
        _place_factors(factors, factors_dir, lambda: fit(model, dataset, tokenizer=tokenizer, text_field=text_field,
                                                         max_length=max_length, modules=modules, progress=progress))
    if distributed:
        torch.distributed.barrier()
    loaded = Factors.load(factors_dir)
    loaded.check_model(model_fingerprint(model), tokenizer_fingerprint(tokenizer))
    max_length = resolve_max_length(model, max_length or loaded.config.max_length or None)
    config = BuildConfig(
        model=model_name,
        model_hash=loaded.config.model_hash,
        tokenizer_hash=loaded.config.tokenizer_hash,
        factors_hash=sha256(factors_dir / FACTORS_FILE),
        data=str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        data_rows=len(dataset),
        data_fingerprint=str(getattr(dataset, "_fingerprint", "")),
        text_field=text_field,
        max_length=max_length,
        shard_size=shard_size,
        compression=compression.to_dict(),
        layers=loaded.config.layers,
    )
    existing = load_build_config(out)
    if existing is not None and (diff := config_differences(existing, config)):
        raise GradIndexError(
            f"{out} holds a build with different {', '.join(diff)}; use another --out or delete that folder"
        )
    if leader and existing is None:
        save_build_config(out, config)
    if shard is None and _complete(out, index_key):
        return out  # already built with these settings: nothing to redo

    compressor = Compressor(loaded, compression)
    mine = [j for j in range(config.n_shards) if shard is None or j % shard[1] == shard[0]]
    todo = [j for j in mine if read_record(out, j) is None]
    bar = tqdm(total=sum(len(config.shard_rows(j)) for j in todo), desc="building shards", unit="seq", disable=not progress)
    for j in todo:
        _build_shard(model, tokenizer, loaded, compressor, dataset, config, out, j, token_budget)
        bar.update(len(config.shard_rows(j)))
    bar.close()
    if distributed:
        torch.distributed.barrier()
    if shard is None or (distributed and leader):
        finalize(out, max_memory=max_memory, index_key=index_key, progress=progress)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


def _complete(out: Path, index_key: str | None) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return index_key is None or manifest["index"]["key"] == index_key


def _torchrun_part() -> tuple[int, int] | None:
    """(rank, world) when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # only barriers travel between ranks; gloo works with or without GPUs
    return dist.get_rank(), dist.get_world_size()


def _place_factors(factors, factors_dir: Path, fit_now) -> None:
    """Put the factors the index is built with in ``factors_dir``: copied, fitted, or already there."""
    if factors is None:
        if (factors_dir / CONFIG_FILE).is_file() and (factors_dir / FACTORS_FILE).is_file():
            return  # fitted by an earlier, interrupted run of this build
        fit_now().save(factors_dir)
    elif isinstance(factors, Factors):
        factors.save(factors_dir)
    else:
        source = Path(factors)
        Factors.load(source)  # clear error when it is not a factors folder
        if source.resolve() != factors_dir.resolve():
            factors_dir.mkdir(parents=True, exist_ok=True)
            for name in (FACTORS_FILE, CONFIG_FILE):
                shutil.copyfile(source / name, factors_dir / (name + ".tmp"))
                os.replace(factors_dir / (name + ".tmp"), factors_dir / name)


def shard_gradients(model, factors: Factors, compressor: Compressor, data: TokenizedSet, *, pad_id: int, token_budget: int):
    """Stage-1 vectors, stage-2 factors (storage dtype) and self-influence of every sequence of ``data``."""
    device, dtype = device_and_dtype(model)
    n = len(data)
    vectors = torch.zeros(n, compressor.vector_dim, dtype=compressor.storage_dtype)
    lowrank = torch.zeros(n, compressor.factor_dim, dtype=compressor.storage_dtype)
    self_influence = torch.zeros(n, dtype=torch.float64)
    bases = {name: (f.q_a.to(device, dtype), f.q_s.to(device, dtype)) for name, f in factors.layers.items()}
    for rows in plan_batches(data, token_budget):
        captured, _ = capture(model, factors.specs, collate(data, rows, pad_id).to(device))
        rotated = {}
        for name, c in captured.items():
            q_a, q_s = bases[name]
            rotated[name] = rotated_sequence_gradients(c.a.to(dtype), c.delta.to(dtype), q_a, q_s)
        v, f, s = compressor.compress(rotated)
        index = torch.tensor(rows)
        vectors[index] = v.to("cpu", compressor.storage_dtype)
        lowrank[index] = f.to("cpu", compressor.storage_dtype)
        self_influence[index] = s.cpu()
    return vectors.numpy(), lowrank.numpy(), self_influence.numpy()


def _build_shard(model, tokenizer, factors, compressor, dataset, config: BuildConfig, out: Path, j: int, token_budget: int) -> None:
    started = time.perf_counter()
    rows = config.shard_rows(j)
    texts = dataset[rows.start : rows.stop][config.text_field]
    data = tokenize_texts(tokenizer, texts, config.max_length)
    vectors, lowrank, self_influence = shard_gradients(
        model, factors, compressor, data, pad_id=tokenizer.pad_token_id, token_budget=token_budget
    )
    (out / "shards").mkdir(exist_ok=True)
    atomic_save_npy(shard_path(out, j, "vectors"), vectors)
    atomic_save_npy(shard_path(out, j, "lowrank"), lowrank)
    meta = pa.table({
        "row_id": pa.array(np.arange(rows.start, rows.stop), pa.int64()),
        "source": pa.array([config.data] * len(rows), pa.string()),
        "offset": pa.array(np.arange(rows.start, rows.stop), pa.int64()),
        "text": pa.array(texts, pa.string()),
        "n_tokens": pa.array([len(x) for x in data.input_ids], pa.int32()),
        "truncated": pa.array(data.truncated, pa.bool_()),
        "input_ids": pa.array([x.astype(np.int32) for x in data.input_ids], pa.list_(pa.int32())),
        "self_influence": pa.array(self_influence, pa.float64()),
    })
    path = shard_path(out, j, "meta")
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(meta, tmp)
    os.replace(tmp, path)
    write_record(out, j, rows, {"token_fingerprint": data.fingerprint(), "seconds": round(time.perf_counter() - started, 3)})


def finalize(out: str | Path, *, max_memory: int = ann.DEFAULT_MAX_MEMORY, index_key: str | None = None, progress: bool = True) -> dict:
    """Index every shard's stage-1 vectors with FAISS and write the manifest (the last file of a build)."""
    out = Path(out)
    config = load_build_config(out)
    if config is None:
        raise GradIndexError(f"no build at {out} (no {BUILD_CONFIG})")
    records = [read_record(out, j) for j in range(config.n_shards)]
    missing = [j for j, r in enumerate(records) if r is None]
    if missing:
        raise GradIndexError(
            f"{out}: {len(missing)} of {config.n_shards} shards not built yet (first: {missing[0]}); "
            "build the remaining parts or merge them in first"
        )
    vectors = [np.load(shard_path(out, j, "vectors"), mmap_mode="r") for j in range(config.n_shards)]
    n, dim = config.data_rows, vectors[0].shape[1]
    key = index_key or ann.choose_key(n, dim, max_memory)
    starts = np.array([config.shard_rows(j).start for j in range(config.n_shards)])

    def sample(rows: np.ndarray) -> np.ndarray:
        j = np.searchsorted(starts, rows, side="right") - 1
        return np.stack([vectors[s][r - starts[s]] for s, r in zip(j, rows)]).astype(np.float32)

    bar = tqdm(total=n, desc=f"indexing ({key})", unit="seq", disable=not progress)
    index = ann.build_index(
        key, dim, n, lambda: (v.astype(np.float32) for v in vectors), sample,
        seed=config.compression.get("seed", 0), use_gpu=ann.gpu_available(), progress=bar.update,
    )
    bar.close()
    tmp = out / (INDEX_FILE + ".tmp")
    ann.save_index(index, tmp)
    os.replace(tmp, out / INDEX_FILE)
    manifest = _manifest(out, config, records, key, dim, index)
    Lexical.fit(shard_texts(out, config.n_shards)).save(out / LEXICAL_DIR, manifest["tokens_fingerprint"])
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest(out: Path, config: BuildConfig, records: list[dict], key: str, dim: int, index) -> dict:
    import faiss
    import transformers

    fingerprint = hashlib.blake2b(digest_size=16)
    for r in records:
        fingerprint.update(r["token_fingerprint"].encode())
    shard_bytes = {kind: sum(r["files"][kind]["bytes"] for r in records) for kind in ("vectors", "lowrank", "meta")}
    index_entry = file_entry(out, out / INDEX_FILE)
    n = config.data_rows
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "gradindex": __version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version(),
        },
        **asdict(config),
        "tokens_fingerprint": fingerprint.hexdigest(),
        "n_rows": n,
        "vector_dim": dim,
        "factor_dim": int(np.load(shard_path(out, 0, "lowrank"), mmap_mode="r").shape[1]),
        "index": {"key": key, "nprobe": ann.default_nprobe(key), "ntotal": int(index.ntotal), "file": index_entry},
        "factors": {"files": [file_entry(out, out / FACTORS_DIR / name) for name in (FACTORS_FILE, CONFIG_FILE)]},
        "bytes_per_sequence": {
            "stage1_vectors": shard_bytes["vectors"] / n, "stage2_factors": shard_bytes["lowrank"] / n,
            "metadata": shard_bytes["meta"] / n, "faiss_index": index_entry["bytes"] / n,
            "total": (sum(shard_bytes.values()) + index_entry["bytes"]) / n,
        },
        "shards": records,
    }


def merge(parts: list[str | Path], out: str | Path, *, max_memory: int = ann.DEFAULT_MAX_MEMORY,
          index_key: str | None = None, progress: bool = True) -> dict:
    """Join the shards of parts built with ``shard=(i, n)`` into ``out`` and index them."""
    out = Path(out)
    if not parts:
        raise GradIndexError("nothing to merge: give the part folders")
    configs = []
    for part in map(Path, parts):
        config = load_build_config(part)
        if config is None:
            raise GradIndexError(f"{part} is not a gradindex build (no {BUILD_CONFIG})")
        if configs and (diff := config_differences(configs[0][1], config)):
            raise GradIndexError(f"{part} was built with different {', '.join(diff)} from {configs[0][0]}")
        configs.append((part, config))
    config = configs[0][1]
    target = load_build_config(out)
    if target is not None and (diff := config_differences(target, config)):
        raise GradIndexError(f"{out} holds a build with different {', '.join(diff)}")
    out.mkdir(parents=True, exist_ok=True)
    first = configs[0][0]
    if first.resolve() != out.resolve():
        _place_factors(first / FACTORS_DIR, out / FACTORS_DIR, None)
        save_build_config(out, config)
    (out / "shards").mkdir(exist_ok=True)
    for part, _ in configs:
        if part.resolve() == out.resolve():
            continue
        for j in range(config.n_shards):
            record = read_record(part, j)
            if record is None or read_record(out, j) is not None:
                continue
            for kind in ("vectors", "lowrank", "meta"):
                _link_or_copy(shard_path(part, j, kind), shard_path(out, j, kind))
            _link_or_copy(part / "shards" / f"{j:05d}.json", out / "shards" / f"{j:05d}.json")  # the record last
    return finalize(out, max_memory=max_memory, index_key=index_key, progress=progress)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
