"""The on-disk format of an index: every file of it is written and read here.

    NAME/
      build.json            what is being built (written first; a resumed build must match it)
      factors/              the EK-FAC factors the vectors were whitened with
      shards/00000.*        per shard of rows [j·S, (j+1)·S): codes.npy (one fixed-size code per row),
                            meta.parquet (global row id, source, offset, text, tokens, the code's squared
                            norm), and 00000.json, written last, which marks the shard complete
      index.faiss           the stage-1 FAISS index over the codes' prefixes (compact codes of its own,
                            not a second copy)
      lexical/              TF-IDF of every text (derived data: rebuilt from the metadata if missing)
      manifest.json         written last: the index is complete iff it exists

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
from .manifest import FILE_KINDS, BuildConfig, FaissEntry, FileEntry, Manifest, ShardRecord

BUILD_CONFIG = "build.json"
INDEX_FILE = "index.faiss"
FACTORS_DIR = "factors"
SHARDS_DIR = "shards"
LEXICAL_DIR = "lexical"
MANIFEST = "manifest.json"
_SUFFIX = {"codes": "codes.npy", "meta": "meta.parquet"}


def shard_path(root: Path, j: int, kind: str) -> Path:
    return Path(root) / SHARDS_DIR / f"{j:05d}.{_SUFFIX[kind]}"


def record_path(root: Path, j: int) -> Path:
    return Path(root) / SHARDS_DIR / f"{j:05d}.json"


# -- build config ---------------------------------------------------------------------------------

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


# -- shards ---------------------------------------------------------------------------------------

def write_shard(root: Path, j: int, rows: range, *, texts: list[str], tokens: TokenizedSet, codes: np.ndarray,
                self_influence: np.ndarray, source: str, started: float) -> ShardRecord:
    """Write shard j's files, then its record: the marker that the shard is complete."""
    root = Path(root)
    with atomic_write(shard_path(root, j, "codes")) as tmp, open(tmp, "wb") as f:
        np.save(f, codes)
    meta = pa.table({  # the metadata schema
        "row_id": pa.array(np.arange(rows.start, rows.stop), pa.int64()),
        "source": pa.array([source] * len(rows), pa.string()),
        "offset": pa.array(np.arange(rows.start, rows.stop), pa.int64()),
        "text": pa.array(texts, pa.string()),
        "n_tokens": pa.array([len(x) for x in tokens.input_ids], pa.int32()),
        "truncated": pa.array(tokens.truncated, pa.bool_()),
        "input_ids": pa.array([x.astype(np.int32) for x in tokens.input_ids], pa.list_(pa.int32())),
        "self_influence": pa.array(self_influence, pa.float64()),
    })
    with atomic_write(shard_path(root, j, "meta")) as tmp:
        pq.write_table(meta, tmp)
    seconds = round(time.perf_counter() - started, 3)
    files = {kind: FileEntry.of(root, shard_path(root, j, kind)) for kind in FILE_KINDS}
    record = ShardRecord(j, (rows.start, rows.stop), files, tokens.fingerprint(), seconds)
    write_json(record_path(root, j), record.to_dict())
    return record


def read_record(root: Path, j: int) -> ShardRecord | None:
    """The shard's record if the shard is complete (record present, files of the recorded sizes)."""
    path = record_path(root, j)
    try:
        record = ShardRecord.from_dict(read_json(path))
    except GradIndexError:
        return None
    return record if all(f.problem(Path(root), rehash=False) is None for f in record.files.values()) else None


def copy_shard(source: Path, target: Path, j: int) -> None:
    """Hard-link (or copy) a complete shard of another build of the same config, its record last."""
    for src, dst in [(shard_path(source, j, k), shard_path(target, j, k)) for k in FILE_KINDS] + [(record_path(source, j), record_path(target, j))]:
        with atomic_write(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)


# -- the FAISS index and the TF-IDF ---------------------------------------------------------------

def write_faiss(root: Path, faiss_index) -> None:
    with atomic_write(Path(root) / INDEX_FILE) as tmp:
        ann.save_index(faiss_index, tmp)


def read_faiss(root: Path, manifest: Manifest, use_gpu: bool = False):
    faiss_index = ann.load_index(Path(root) / INDEX_FILE, use_gpu=use_gpu)
    if faiss_index.ntotal != manifest.n_rows or faiss_index.d != manifest.vector_dim:
        raise GradIndexError(f"index {root}: {INDEX_FILE} holds {faiss_index.ntotal}×{faiss_index.d} vectors, the manifest says "
                             f"{manifest.n_rows}×{manifest.vector_dim}")
    return faiss_index


def write_lexical(root: Path, lexical: Lexical, fingerprint: str) -> None:
    """``lexical/``, tagged with the fingerprint of the tokens it was fitted on (a rebuilt index never reads a
    stale one) and the sha256 of its files (a damaged one is never read)."""
    with atomic_write(Path(root) / LEXICAL_DIR) as tmp:
        lexical.save(tmp)
        hashes = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        write_json(tmp / "lexical.json", {"fingerprint": fingerprint, "rows": lexical.matrix.shape[0], "sha256": hashes}, indent=None)


def read_lexical(root: Path, fingerprint: str) -> Lexical | None:
    """The stored TF-IDF of the index with this tokens fingerprint, or None if absent, unreadable, damaged or
    stale (it is derived data: the caller rebuilds it from the metadata)."""
    directory = Path(root) / LEXICAL_DIR
    try:
        record = read_json(directory / "lexical.json")
        hashes = record["sha256"]
        present = {p.name for p in directory.iterdir()} - {"lexical.json"}
        if record["fingerprint"] != fingerprint or present != set(hashes) or any(sha256(directory / n) != h for n, h in hashes.items()):
            return None
        return Lexical.load(directory)
    except (GradIndexError, OSError, ValueError, KeyError, TypeError, EOFError):
        return None


# -- the manifest ---------------------------------------------------------------------------------

def describe(root: Path, config: BuildConfig, records: list[ShardRecord], key: str, faiss_index) -> Manifest:
    """The manifest of a finished build whose FAISS index is written. The factors' tensors keep the hash
    taken when they were placed (``config.factors_hash``)."""
    root = Path(root)
    tensors = root / FACTORS_DIR / FACTORS_FILE
    return Manifest.describe(
        config, records,
        index=FaissEntry(key, ann.default_nprobe(key), int(faiss_index.ntotal), FileEntry.of(root, root / INDEX_FILE)),
        vector_dim=int(faiss_index.d),
        code_dim=int(np.load(shard_path(root, 0, "codes"), mmap_mode="r").shape[1]),
        factors_files=[FileEntry(tensors.relative_to(root).as_posix(), tensors.stat().st_size, config.factors_hash),
                       FileEntry.of(root, root / FACTORS_DIR / CONFIG_FILE)],
    )


def save_manifest(root: Path, manifest: Manifest) -> None:
    write_json(Path(root) / MANIFEST, manifest.to_dict())


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


def is_complete(root: Path, index_key: str | None = None) -> bool:
    """Whether ``root`` holds a finished index (with FAISS index ``index_key``, if given)."""
    try:
        manifest = load_manifest(root)
    except GradIndexError:
        return False
    return index_key is None or manifest.index.key == index_key


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
