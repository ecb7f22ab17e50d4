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
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

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


# -- reading --------------------------------------------------------------------------------------

class ShardReader:
    """Read access to an index's shards by global row: metadata, token ids, codes and their stage-1 prefixes.

    Arrays are memory-mapped and only the requested rows (and prefixes) are read. Given the shard records, a
    shard file is re-hashed the first time it is read (once per reader), so damage is refused, not answered.
    """

    def __init__(self, root: Path, shard_size: int, n_shards: int, stage1_dim: int | None,
                 records: Sequence[ShardRecord] | None = None):
        self.root, self.shard_size, self.n_shards, self._stage1_dim = Path(root), shard_size, n_shards, stage1_dim
        self._meta: dict[int, pa.Table] = {}
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._unchecked = {(r.shard, kind): f for r in records for kind, f in r.files.items()} if records is not None else {}
        self._check_lock = threading.Lock()

    @classmethod
    def of(cls, root: Path, config: BuildConfig, records: Sequence[ShardRecord] | None = None) -> "ShardReader":
        return cls(root, config.shard_size, config.n_shards, config.compression.stage1_dim, records)

    def _check(self, shards, kind: str) -> None:
        with self._check_lock:  # a file is hashed once even when threads ask for it together
            check_hashes(self.root, [self._unchecked.pop((int(j), kind)) for j in shards if (int(j), kind) in self._unchecked])

    @property
    def stage1_dim(self) -> int:
        return min(self._stage1_dim or 1 << 62, self._mapped("codes")[0].shape[1])

    def meta(self, j: int) -> pa.Table:
        if j not in self._meta:
            self._check([j], "meta")
            try:
                table = pq.read_table(shard_path(self.root, j, "meta"), memory_map=True)
            except Exception as e:
                raise GradIndexError(f"cannot read metadata shard {j} of {self.root}: {e}") from None
            expected = np.arange(j * self.shard_size, j * self.shard_size + table.num_rows)
            if not np.array_equal(table.column("row_id").to_numpy(), expected):
                raise GradIndexError(f"metadata shard {j} of {self.root} does not hold rows {expected[0]}–{expected[-1]}")
            self._meta[j] = table
        return self._meta[j]

    def rows(self, rows: Sequence[int], columns: Sequence[str] = ("text", "source", "offset")) -> dict[str, list]:
        """Metadata columns of the given global rows, in the given order."""
        out: dict[str, list] = {c: [None] * len(rows) for c in columns}
        rows = np.asarray(rows, dtype=np.int64)
        for j in np.unique(rows // self.shard_size):
            where = np.nonzero(rows // self.shard_size == j)[0]
            table = self.meta(int(j)).take(rows[where] - j * self.shard_size)
            for c in columns:
                for w, v in zip(where, table.column(c).to_pylist()):
                    out[c][w] = v
        return out

    def token_ids(self, rows: Sequence[int]) -> list[list[int]]:
        return self.rows(rows, ("input_ids",))["input_ids"]

    def self_influence(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Stored I(z, z) of the given rows (of every row when None)."""
        if rows is None:
            return np.concatenate([self.meta(j).column("self_influence").to_numpy() for j in range(self.n_shards)])
        return np.asarray(self.rows(rows, ("self_influence",))["self_influence"], dtype=np.float64)

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """Stage-1 vectors (code prefixes) of the given rows, in the storage dtype."""
        return self._read("codes", rows, self.stage1_dim)

    def codes(self, rows: Sequence[int], width: int | None = None) -> np.ndarray:
        """Stage-2 codes of the given rows: the first ``width`` values of each (a lower rank), or all."""
        return self._read("codes", rows, width)

    def vector_blocks(self) -> Iterator[np.ndarray]:
        """Every stage-1 vector as float32, a shard at a time, in row order."""
        for j, v in enumerate(self._mapped("codes")):
            self._check([j], "codes")
            yield np.ascontiguousarray(v[:, : self.stage1_dim], dtype=np.float32)

    def texts(self) -> Iterator[str]:
        """Every stored text, in row order."""
        for j in range(self.n_shards):
            self._check([j], "meta")
            yield from pq.read_table(shard_path(self.root, j, "meta"), columns=["text"]).column("text").to_pylist()

    def _mapped(self, kind: str) -> list[np.ndarray]:
        if kind not in self._arrays:
            self._arrays[kind] = [_map_array(shard_path(self.root, j, kind)) for j in range(self.n_shards)]
        return self._arrays[kind]

    def _read(self, kind: str, rows: Sequence[int], width: int | None) -> np.ndarray:
        arrays = self._mapped(kind)
        rows = np.asarray(rows, dtype=np.int64)
        width = width or arrays[0].shape[1]
        out = np.empty((len(rows), width), dtype=arrays[0].dtype)
        shard = rows // self.shard_size
        self._check(np.unique(shard), kind)
        for j in np.unique(shard):
            where = np.nonzero(shard == j)[0]
            local = rows[where] - j * self.shard_size
            order = np.argsort(local)  # ascending reads are kinder to the page cache
            out[where[order]] = arrays[j][local[order], :width]
        return out


def _map_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise GradIndexError(f"cannot read {path} ({type(e).__name__}: {e}); `gradindex verify` lists every damaged file") from None
    if array.ndim != 2:
        raise GradIndexError(f"{path} holds an array of shape {array.shape}, not one code per row; the file is damaged")
    return array
