"""The on-disk layout of an index: shards, their records, the build config and the manifest.

    NAME/
      build.json            what is being built (written first; a resumed build must match it)
      factors/              the EK-FAC factors the vectors were whitened with
      shards/00000.*        per shard of rows [j·S, (j+1)·S): vectors.npy (stage 1), lowrank.npy
                            (stage 2), meta.parquet (global row id, source, offset, text, tokens),
                            and 00000.json, written last, which marks the shard complete
      index.faiss           the stage-1 FAISS index over all rows
      manifest.json         written last: the index is complete iff it exists

Every file is written under a temporary name and renamed, so a killed build leaves only complete
files behind. Metadata carries explicit global row ids; nothing is paired by file order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from .errors import GradIndexError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BUILD_CONFIG = "build.json"
INDEX_FILE = "index.faiss"
FACTORS_DIR = "factors"
SHARDS_DIR = "shards"
SHARD_KINDS = ("vectors", "lowrank", "meta")
_SUFFIX = {"vectors": "vectors.npy", "lowrank": "lowrank.npy", "meta": "meta.parquet"}


@dataclass
class BuildConfig:
    """What an index is built from; a resumed or merged build must agree on every field."""

    model: str
    model_hash: str
    tokenizer_hash: str
    factors_hash: str
    data: str
    data_rows: int
    data_fingerprint: str
    text_field: str
    max_length: int
    shard_size: int
    compression: dict
    layers: list[dict] = field(default_factory=list)

    @property
    def n_shards(self) -> int:
        return -(-self.data_rows // self.shard_size)

    def shard_rows(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.data_rows))


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def shard_path(root: Path, j: int, kind: str) -> Path:
    return root / SHARDS_DIR / f"{j:05d}.{_SUFFIX[kind]}"


def record_path(root: Path, j: int) -> Path:
    return root / SHARDS_DIR / f"{j:05d}.json"


def write_record(root: Path, j: int, rows: range, extra: dict) -> dict:
    """Hash a shard's files and write its record — the marker that the shard is complete."""
    files = {}
    for kind in SHARD_KINDS:
        p = shard_path(root, j, kind)
        files[kind] = {"name": f"{SHARDS_DIR}/{p.name}", "bytes": p.stat().st_size, "sha256": sha256(p)}
    record = {"shard": j, "rows": [rows.start, rows.stop], "files": files, **extra}
    atomic_write_text(record_path(root, j), json.dumps(record, indent=1))
    return record


def read_record(root: Path, j: int) -> dict | None:
    """The shard's record if the shard is complete (record present, files of the recorded sizes)."""
    p = record_path(root, j)
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    for f in record.get("files", {}).values():
        q = root / f["name"]
        if not q.is_file() or q.stat().st_size != f["bytes"]:
            return None
    return record


def save_build_config(root: Path, config: BuildConfig) -> None:
    atomic_write_text(root / BUILD_CONFIG, json.dumps(asdict(config), indent=2))


def load_build_config(root: Path) -> BuildConfig | None:
    p = root / BUILD_CONFIG
    if not p.is_file():
        return None
    try:
        return BuildConfig(**json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise GradIndexError(f"{p} is unreadable ({e}); delete the folder to start over") from None


def config_differences(a: BuildConfig, b: BuildConfig) -> list[str]:
    return [k for k, v in asdict(a).items() if asdict(b)[k] != v]


def load_manifest(root: Path) -> dict:
    """The manifest of a complete index, with clear errors for a missing, half-built or newer one."""
    root = Path(root)
    if not root.is_dir():
        raise GradIndexError(f"no index at {root} (folder not found)")
    p = root / MANIFEST
    if not p.is_file():
        config = load_build_config(root)
        if config is None:
            raise GradIndexError(f"no index at {root} (no {MANIFEST}; build one with `gradindex build`)")
        done = sum(read_record(root, j) is not None for j in range(config.n_shards))
        raise GradIndexError(
            f"index at {root} is incomplete ({done} of {config.n_shards} shards built, no {MANIFEST}); "
            "re-run the same `gradindex build` to finish it"
        )
    try:
        manifest = json.loads(p.read_text())
    except ValueError as e:
        raise GradIndexError(f"{p} is not valid JSON ({e})") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise GradIndexError(
            f"index at {root} has schema version {version}, newer than this gradindex reads ({SCHEMA_VERSION}); upgrade gradindex"
        )
    return manifest


def manifest_files(manifest: dict) -> list[dict]:
    """Every file the manifest vouches for, with its size and hash."""
    files = [f for shard in manifest["shards"] for f in shard["files"].values()]
    return files + [manifest["index"]["file"]] + manifest["factors"]["files"]


def check_sizes(root: Path, manifest: dict) -> None:
    """Cheap integrity check on open: every file present with its recorded size (``verify`` re-hashes)."""
    for f in manifest_files(manifest):
        p = root / f["name"]
        if not p.is_file():
            raise GradIndexError(f"index at {root} is missing {f['name']}")
        if p.stat().st_size != f["bytes"]:
            raise GradIndexError(f"{p} is {p.stat().st_size} bytes, the manifest says {f['bytes']}: truncated or corrupt")


def verify(root: Path) -> list[str]:
    """Re-hash every file against the manifest; returns the problems found (empty when sound)."""
    root = Path(root)
    manifest = load_manifest(root)
    problems = []
    for f in manifest_files(manifest):
        p = root / f["name"]
        if not p.is_file():
            problems.append(f"missing {f['name']}")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['name']}: {p.stat().st_size} bytes, expected {f['bytes']}")
        elif sha256(p) != f["sha256"]:
            problems.append(f"{f['name']}: sha256 differs from the manifest")
    return problems


def file_entry(root: Path, path: Path) -> dict:
    return {"name": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256(path)}


def shard_texts(root: Path, n_shards: int) -> Iterator[str]:
    """Every stored text, in row order."""
    for j in range(n_shards):
        yield from pq.read_table(shard_path(root, j, "meta"), columns=["text"]).column("text").to_pylist()
