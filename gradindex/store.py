"""The on-disk format of an index: every file of it is written and read here.

    NAME/
      build.json            what is being built (written first; a resumed build must match it)
      factors/              the EK-FAC factors the vectors were whitened with
      shards/00000.*        per shard of rows [j·S, (j+1)·S): codes.npy (one fixed-size code per row),
                            meta.parquet (row id, source, offset: the document's row in it, start: its
                            window's first token, text, tokens, the code's squared norm), 00000.json: complete
      index.faiss           the stage-1 FAISS index over the codes' prefixes (compact codes, not a copy)
      lexical/              TF-IDF of every live text (derived data: rebuilt from the metadata if missing)
      adapter/              built from a PeftModel object only: its LoRA adapter and tokenizer, the model to reopen
      manifest.json         written last: the index is complete iff it exists

An update (``add``, ``remove``, ``compact``) writes generation g + 1 beside generation g: new shards (a compaction's
under shards.G/), index.G.faiss, removed.G.npy (the tombstoned rows), and the manifest last, so a reader
that opened generation g keeps reading its own files; files of generations before g are then deleted.

Every file is written atomically (``files.atomic_write``), so a killed build leaves only complete files
behind. Metadata carries explicit global row ids; nothing is paired by file order.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import ann
from .data import TokenizedSet
from .errors import GradIndexError
from .factors import CONFIG_FILE, FACTORS_FILE
from .files import atomic_write, read_json, sha256, write_json
from .lexical import Lexical
from .manifest import FILE_KINDS, Addition, BuildConfig, FaissEntry, FileEntry, Manifest, ShardRecord

BUILD_CONFIG = "build.json"
INDEX_FILE = "index.faiss"
FACTORS_DIR = "factors"
SHARDS_DIR = "shards"
LEXICAL_DIR = "lexical"
ADAPTER_DIR = "adapter"
MANIFEST = "manifest.json"
PENDING_ADD = "add.json"  # what an unfinished ``add`` appends (its shards are not in any manifest yet)
_SUFFIX = {"codes": "codes.npy", "meta": "meta.parquet"}


def shard_path(root: Path, j: int, kind: str, directory: str = SHARDS_DIR) -> Path:
    return Path(root) / directory / f"{j:05d}.{_SUFFIX[kind]}"


def record_path(root: Path, j: int, directory: str = SHARDS_DIR) -> Path:
    return Path(root) / directory / f"{j:05d}.json"


def _generation_file(stem: str, suffix: str, generation: int) -> str:
    return f"{stem}{suffix}" if generation <= 1 else f"{stem}.{generation:05d}{suffix}"


def shards_dir(generation: int) -> str:
    """Where a compaction to ``generation`` puts its shards (a build's are in shards/)."""
    return _generation_file(SHARDS_DIR, "", generation)


def save_build_config(root: Path, config: BuildConfig) -> None:
    write_json(Path(root) / BUILD_CONFIG, config.to_dict(), indent=2)


def load_build_config(root: Path) -> BuildConfig | None:
    path = Path(root) / BUILD_CONFIG
    if not path.is_file():
        return None
    try:
        return BuildConfig.from_dict(read_json(path), where=str(path))
    except GradIndexError as e:
        raise GradIndexError(f"{path} is unreadable ({e}); delete the folder to start over") from None


def write_shard(root: Path, j: int, rows: range, *, texts: list[str], tokens: TokenizedSet, codes: np.ndarray,
                self_influence: np.ndarray, source: str | list[str], started: float, offsets: np.ndarray | None = None,
                starts: np.ndarray | None = None, directory: str = SHARDS_DIR) -> ShardRecord:
    """Write shard j's files, then its record: the marker that the shard is complete. ``offsets``: each row's
    document, its place in its source (default: the row id); ``starts``: the token where its window starts (0)."""
    root = Path(root)
    with atomic_write(shard_path(root, j, "codes", directory)) as tmp, open(tmp, "wb") as f:
        np.save(f, codes)
    meta = pa.table({  # the metadata schema
        "row_id": pa.array(np.arange(rows.start, rows.stop), pa.int64()),
        "source": pa.array([source] * len(rows) if isinstance(source, str) else source, pa.string()),
        "offset": pa.array(np.arange(rows.start, rows.stop) if offsets is None else offsets, pa.int64()),
        "start": pa.array(np.zeros(len(rows), np.int64) if starts is None else starts, pa.int64()),
        "text": pa.array(texts, pa.string()),
        "n_tokens": pa.array([len(x) for x in tokens.input_ids], pa.int32()),
        "truncated": pa.array(tokens.truncated, pa.bool_()),
        "input_ids": pa.array([x.astype(np.int32) for x in tokens.input_ids], pa.list_(pa.int32())),
        "self_influence": pa.array(self_influence, pa.float64()),
    })
    with atomic_write(shard_path(root, j, "meta", directory)) as tmp:
        pq.write_table(meta, tmp)
    seconds = round(time.perf_counter() - started, 3)
    files = {kind: FileEntry.of(root, shard_path(root, j, kind, directory)) for kind in FILE_KINDS}
    record = ShardRecord(j, (rows.start, rows.stop), files, tokens.fingerprint(), seconds)
    write_json(record_path(root, j, directory), record.to_dict())
    return record


def read_record(root: Path, j: int, directory: str = SHARDS_DIR) -> ShardRecord | None:
    """The shard's record if the shard is complete (record present, files of the recorded sizes)."""
    path = record_path(root, j, directory)
    try:
        record = ShardRecord.from_dict(read_json(path))
    except GradIndexError:
        return None
    return record if all(f.problem(Path(root), rehash=False) is None for f in record.files.values()) else None


def shards_of(manifest: Manifest) -> str:
    """The folder (inside the index) that holds the manifest's shards and receives added ones."""
    return Path(manifest.shards[-1].files["codes"].name).parent.as_posix()


def drop_shards(root: Path, directory: str, first: int) -> None:
    """Delete shards from ``first`` on that no manifest names (an abandoned add's), records first."""
    for path in sorted((Path(root) / directory).glob("*.json")):
        if path.stem.isdigit() and int(path.stem) >= first:
            path.unlink()
            for kind in FILE_KINDS:
                shard_path(root, int(path.stem), kind, directory).unlink(missing_ok=True)


def read_pending(root: Path) -> Addition | None:
    path = Path(root) / PENDING_ADD
    return Addition.from_json(read_json(path), str(path)) if path.is_file() else None


def save_pending(root: Path, addition: Addition | None) -> None:
    write_json(Path(root) / PENDING_ADD, addition.to_json()) if addition else (Path(root) / PENDING_ADD).unlink(missing_ok=True)


def copy_shard(source: Path, target: Path, j: int) -> None:
    """Hard-link (or copy) a complete shard of another build of the same config, its record last."""
    for src, dst in [(shard_path(source, j, k), shard_path(target, j, k)) for k in FILE_KINDS] + [(record_path(source, j), record_path(target, j))]:
        with atomic_write(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)


def write_faiss(root: Path, faiss_index, generation: int = 1) -> Path:
    path = Path(root) / _generation_file("index", ".faiss", generation)
    with atomic_write(path) as tmp:
        ann.save_index(faiss_index, tmp)
    return path


def read_faiss(root: Path, manifest: Manifest, use_gpu: bool = False, mmap: bool = False):
    faiss_index = ann.load_index(Path(root) / manifest.index.file.name, use_gpu=use_gpu, mmap=mmap)
    if faiss_index.ntotal != manifest.n_rows or faiss_index.d != manifest.vector_dim:
        raise GradIndexError(f"index {root}: {INDEX_FILE} holds {faiss_index.ntotal}×{faiss_index.d} vectors, the manifest says "
                             f"{manifest.n_rows}×{manifest.vector_dim}")
    return faiss_index


def write_lexical(root: Path, lexical: Lexical, fingerprint: str, generation: int = 1) -> None:
    """``lexical/``, tagged with the fingerprint of the content it was fitted on (a rebuilt index never reads a
    stale one) and the sha256 of its files (a damaged one is never read)."""
    with atomic_write(Path(root) / _generation_file(LEXICAL_DIR, "", generation)) as tmp:
        lexical.save(tmp)
        hashes = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        write_json(tmp / "lexical.json", {"fingerprint": fingerprint, "rows": lexical.matrix.shape[0], "sha256": hashes}, indent=None)


def read_lexical(root: Path, fingerprint: str, generation: int = 1) -> Lexical | None:
    """The stored TF-IDF of the index with this content fingerprint, or None if absent, unreadable, damaged or
    stale (it is derived data: the caller rebuilds it from the metadata)."""
    directory = Path(root) / _generation_file(LEXICAL_DIR, "", generation)
    try:
        record = read_json(directory / "lexical.json")
        hashes = record["sha256"]
        present = {p.name for p in directory.iterdir()} - {"lexical.json"}
        if record["fingerprint"] != fingerprint or present != set(hashes) or any(sha256(directory / n) != h for n, h in hashes.items()):
            return None
        return Lexical.load(directory)
    except (GradIndexError, OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def write_removed(root: Path, rows: np.ndarray, generation: int) -> FileEntry:
    path = Path(root) / _generation_file("removed", ".npy", generation)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.unique(np.asarray(rows, dtype=np.int64)))
    return FileEntry.of(Path(root), path)


def read_removed(root: Path, manifest: Manifest) -> np.ndarray:
    """The tombstoned rows of the index (hash-checked: a damaged list could resurrect a removed row)."""
    if manifest.removed is None:
        return np.zeros(0, dtype=np.int64)
    check_hashes(root, [manifest.removed])
    rows = np.load(Path(root) / manifest.removed.name, allow_pickle=False)
    if rows.ndim != 1 or rows.dtype != np.int64 or len(rows) != manifest.n_removed:
        raise GradIndexError(f"index at {root}: {manifest.removed.name} does not hold the {manifest.n_removed} removed rows")
    return rows


def describe(root: Path, config: BuildConfig, records: list[ShardRecord], key: str, faiss_index, faiss_path: Path | None = None,
             **update) -> Manifest:
    """The manifest of a finished build (or update: ``generation``, ``additions``, ``removed``, ``n_removed``)
    whose FAISS index is written. The factors' tensors keep the hash taken when they were placed."""
    root = Path(root)
    tensors = root / FACTORS_DIR / FACTORS_FILE
    return Manifest.describe(
        config, records,
        index=FaissEntry(key, ann.default_nprobe(key), int(faiss_index.ntotal), FileEntry.of(root, faiss_path or root / INDEX_FILE)),
        vector_dim=int(faiss_index.d),
        code_dim=int(np.load(root / records[0].files["codes"].name, mmap_mode="r").shape[1]),
        factors_files=[FileEntry(tensors.relative_to(root).as_posix(), tensors.stat().st_size, config.factors_hash),
                       FileEntry.of(root, root / FACTORS_DIR / CONFIG_FILE)],
        **update,
    )


def save_manifest(root: Path, manifest: Manifest) -> None:
    write_json(Path(root) / MANIFEST, manifest.to_dict())


def drop_old_generations(root: Path, manifest: Manifest, previous: Manifest | None) -> None:
    """Delete what neither this generation nor the previous one reads (a reader may still have that one open)."""
    root, kept = Path(root), [m for m in (manifest, previous) if m is not None]
    keep = {Path(f.name).parts[0] for m in kept for f in m.files()} | {_generation_file(LEXICAL_DIR, "", m.generation) for m in kept}
    patterns = (INDEX_FILE, "index.*.faiss", "removed.*.npy", SHARDS_DIR, f"{SHARDS_DIR}.*", LEXICAL_DIR, f"{LEXICAL_DIR}.*")
    for path in {p for pattern in patterns for p in root.glob(pattern)}:
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def load_manifest(root: Path) -> Manifest:
    """The manifest of a complete index, with clear errors for a missing, half-built or newer one."""
    root = Path(root)
    if not root.is_dir():
        raise GradIndexError(f"no index at {root} (folder not found)")
    path = root / MANIFEST
    if not path.is_file():
        config = load_build_config(root)
        if config is None:
            raise GradIndexError(f"no index at {root} (no {MANIFEST}; build one with `gradindex build`)")
        done = sum(read_record(root, j) is not None for j in range(config.n_shards))
        raise GradIndexError(
            f"index at {root} is incomplete ({done} of {config.n_shards} shards built, no {MANIFEST}); "
            "re-run the same `gradindex build` to finish it"
        )
    return Manifest.from_dict(read_json(path), where=f"index at {root}")


def save_adapter(root: Path, lm) -> None:
    """A PeftModel object's adapter and tokenizer, which ``from_pretrained`` loads back onto the base model."""
    with atomic_write(Path(root) / ADAPTER_DIR) as tmp:
        lm.save_adapter(tmp)


def model_source(root: Path, config: BuildConfig) -> str:
    """Where the index's model loads from: the adapter saved in it (built from a PeftModel object), else as recorded."""
    return str(Path(root) / ADAPTER_DIR) if (Path(root) / ADAPTER_DIR).is_dir() else config.model


def is_complete(root: Path, index_key: str | None = None) -> bool:
    """Whether ``root`` holds a finished index (with FAISS index ``index_key``, if given)."""
    try:
        return index_key in (None, load_manifest(root).index.key)
    except GradIndexError:
        return False


def check_sizes(root: Path, manifest: Manifest) -> None:
    """Cheap integrity check on open: every file present with its recorded size (``verify`` re-hashes)."""
    for f in manifest.files():
        if (problem := f.problem(Path(root), rehash=False)) is not None:
            if problem.startswith("missing"):
                raise GradIndexError(f"index at {root} is {problem}")
            raise GradIndexError(f"{Path(root) / f.name} is {(Path(root) / f.name).stat().st_size} bytes, the manifest says "
                                 f"{f.bytes}: truncated or corrupt")


def check_hashes(root: Path, entries: Sequence[FileEntry]) -> None:
    """Refuse files whose bytes differ from what the index vouches for (a flipped bit must never become an answer)."""
    for f in entries:
        if (problem := f.problem(Path(root), rehash=True)) is not None:
            raise GradIndexError(f"index at {root} is damaged ({problem}); `gradindex verify` lists every damaged file")


def verify(root: Path) -> list[str]:
    """Re-hash every file against the manifest; returns the problems found (empty when sound)."""
    manifest = load_manifest(Path(root))
    return [p for f in manifest.files() if (p := f.problem(Path(root), rehash=True)) is not None]
