"""The typed records an index keeps about itself (``build.json``, the shard records, ``manifest.json``) and
their JSON forms. Where they live on disk is ``store``'s business.

Schema 3 stores one fixed-size code per sequence (``codeplan``); indexes of schemas 1 and 2 (per-layer sketches
and low-rank codes, whose size grew with the model) are refused with a request to rebuild.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .codeplan import CompressionConfig
from .errors import GradIndexError
from .files import from_dict, sha256

SCHEMA_VERSION = 3
FILE_KINDS = ("codes", "meta")  # a shard's files: the codes (stage 1 indexes their prefix), metadata


@dataclass(frozen=True)
class FileEntry:
    """A file an index vouches for: its path inside the index, size and sha256."""

    name: str
    bytes: int
    sha256: str

    def __post_init__(self):
        # A name from a manifest is joined to the index folder: it must not reach outside it.
        parts = Path(str(self.name)).parts
        if not parts or Path(str(self.name)).is_absolute() or ".." in parts or "\\" in str(self.name):
            raise GradIndexError(f"file entry {self.name!r} points outside the index folder")

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileEntry":
        return cls(path.relative_to(root).as_posix(), path.stat().st_size, sha256(path))

    def problem(self, root: Path, rehash: bool) -> str | None:
        """What is wrong with the file on disk, if anything: missing, another size, (``rehash``) other bytes."""
        path = root / self.name
        if not path.is_file():
            return f"missing {self.name}"
        if path.stat().st_size != self.bytes:
            return f"{self.name}: {path.stat().st_size} bytes, expected {self.bytes}"
        if rehash and sha256(path) != self.sha256:
            return f"{self.name}: sha256 differs from the manifest"
        return None


@dataclass(frozen=True)
class ShardRecord:
    """Written after a shard's files: the shard is complete iff its record exists and its files match it."""

    shard: int
    rows: tuple[int, int]  # [start, stop)
    files: dict[str, FileEntry]  # by kind (FILE_KINDS)
    token_fingerprint: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"shard": self.shard, "rows": list(self.rows), "files": {k: asdict(f) for k, f in self.files.items()},
                "token_fingerprint": self.token_fingerprint, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardRecord":
        if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
            raise GradIndexError("shard record: expected a JSON object with files")
        files = {k: from_dict(FileEntry, f, where="shard record") for k, f in data.get("files", {}).items()}
        return from_dict(cls, {**data, "rows": tuple(data.get("rows", ())), "files": files}, where="shard record")


def rows_covered(records) -> int | None:
    """How many rows the shard records hold when they cover 0, 1, … once each, in order; None when they do not."""
    stop = 0
    for r in records:
        if r.rows[0] != stop:
            return None
        stop = r.rows[1]
    return stop if records else None


@dataclass(frozen=True)
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
    compression: CompressionConfig
    layers: list[dict] = field(default_factory=list)
    stride: int = 0  # documents split into windows starting every stride tokens; 0: truncated (``documents``)
    documents: int = 0  # documents in the data: data_rows counts windows, without empty documents
    empty_documents: int = 0  # skipped: no text
    chat: bool = False  # text_field held chat messages, rendered with the tokenizer's chat template
    tokenizer: str = ""  # where the tokenizer loads from when it is not the model's own (``--tokenizer``)

    @property
    def n_shards(self) -> int:
        return -(-self.data_rows // self.shard_size)

    def shard_rows(self, j: int) -> range:
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.data_rows))

    def differences(self, other: "BuildConfig") -> list[str]:
        """The fields that make two builds different; the model's, data's and tokenizer's names only describe (their hashes decide)."""
        return [f.name for f in fields(self) if f.name not in ("model", "data", "tokenizer") and getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "compression": self.compression.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "build config") -> "BuildConfig":
        if not isinstance(data, dict) or not isinstance(data.get("compression"), dict):
            raise GradIndexError(f"{where}: not a build config with compression settings")
        return from_dict(cls, {**data, "compression": CompressionConfig.from_dict(data["compression"])}, where=where)


@dataclass(frozen=True)
class Addition:
    """Rows appended by ``gradindex add``, with the index's own factors and compression."""

    data: str
    data_fingerprint: str
    text_field: str
    rows: tuple[int, int]  # [start, stop)
    first_shard: int
    drift: float | None = None  # factor staleness (``update.drift``), measured when the rows were added

    def to_json(self) -> dict:
        return {**asdict(self), "rows": list(self.rows)}

    @classmethod
    def from_json(cls, data: dict, where: str = "addition") -> "Addition":
        if not isinstance(data, dict):
            raise GradIndexError(f"{where}: expected a JSON object")
        return from_dict(cls, {**data, "rows": tuple(data.get("rows", ()))}, where=where)


@dataclass(frozen=True)
class FaissEntry:
    key: str  # the FAISS factory string
    nprobe: int  # IVF lists searched by default (0: not an IVF index)
    ntotal: int
    file: FileEntry


@dataclass(frozen=True)
class Manifest:
    """A complete index: its build config, every file with its hash, sizes and the versions that wrote it."""

    build: BuildConfig
    created: str
    versions: dict[str, str]
    tokens_fingerprint: str  # of every stored token id, in row order
    n_rows: int
    vector_dim: int  # stage-1 vector length (a prefix of the code)
    code_dim: int  # code length
    index: FaissEntry
    factors_files: list[FileEntry]
    bytes_per_sequence: dict[str, float]
    shards: list[ShardRecord]
    schema_version: int = SCHEMA_VERSION
    generation: int = 1  # +1 per add, remove or compact; files a generation wrote carry its number
    additions: list[Addition] = field(default_factory=list)
    removed: FileEntry | None = None  # the tombstoned rows (int64, ascending), if any
    n_removed: int = 0

    @property
    def n_live(self) -> int:
        return self.n_rows - self.n_removed

    @property
    def content_fingerprint(self) -> str:
        """Of the stored tokens and which rows are removed: what derived data (the TF-IDF) must match."""
        if self.removed is None:
            return self.tokens_fingerprint
        return hashlib.blake2b(f"{self.tokens_fingerprint}:{self.removed.sha256}".encode(), digest_size=16).hexdigest()

    @classmethod
    def describe(cls, config: BuildConfig, records: list[ShardRecord], *, index: FaissEntry, vector_dim: int, code_dim: int,
                 factors_files: list[FileEntry], generation: int = 1, additions: list[Addition] | None = None,
                 removed: FileEntry | None = None, n_removed: int = 0) -> "Manifest":
        """The manifest of a build (or update) that has just finished, stamped with the time and the library versions."""
        import faiss
        import numpy as np
        import torch
        import transformers

        fingerprint = hashlib.blake2b(digest_size=16)
        for r in records:
            fingerprint.update(r.token_fingerprint.encode())
        shard_bytes = {kind: sum(r.files[kind].bytes for r in records) for kind in FILE_KINDS}
        n = records[-1].rows[1]
        return cls(
            build=config,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions={"gradindex": __version__, "torch": torch.__version__, "faiss": faiss.__version__,
                      "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version()},
            tokens_fingerprint=fingerprint.hexdigest(), n_rows=n, vector_dim=vector_dim, code_dim=code_dim, index=index,
            factors_files=factors_files,
            bytes_per_sequence={
                "codes": shard_bytes["codes"] / n, "faiss_index": index.file.bytes / n, "metadata": shard_bytes["meta"] / n,
                "total": (sum(shard_bytes.values()) + index.file.bytes) / n,
            },
            shards=records, generation=generation, additions=list(additions or []), removed=removed, n_removed=n_removed,
        )

    def updated(self, **changes) -> "Manifest":
        """The next generation's manifest: ``changes`` applied, stamped now."""
        return replace(self, **changes, generation=self.generation + 1, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def compression(self) -> CompressionConfig:
        return self.build.compression

    def files(self) -> list[FileEntry]:
        """Every file the manifest vouches for."""
        removed = [self.removed] if self.removed is not None else []
        return [f for s in self.shards for f in s.files.values()] + [self.index.file, *self.factors_files, *removed]

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version, "created": self.created, "versions": self.versions, **self.build.to_dict(),
            "tokens_fingerprint": self.tokens_fingerprint, "n_rows": self.n_rows, "vector_dim": self.vector_dim,
            "code_dim": self.code_dim,
            "index": asdict(self.index),
            "factors": {"files": [asdict(f) for f in self.factors_files]},
            "bytes_per_sequence": self.bytes_per_sequence,
            "shards": [s.to_dict() for s in self.shards],
            "generation": self.generation, "additions": [a.to_json() for a in self.additions],
            "removed": asdict(self.removed) if self.removed is not None else None, "n_removed": self.n_removed,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise GradIndexError(f"{where}: the manifest is not a JSON object")
        version = data.get("schema_version")
        if isinstance(version, int) and 1 <= version < SCHEMA_VERSION:
            raise GradIndexError(f"{where} has schema version {version}: per-layer codes that grow with the model, which this "
                                 f"gradindex no longer reads; rebuild the index (`gradindex build`, the factors can be reused)")
        if version != SCHEMA_VERSION:
            raise GradIndexError(f"{where} has schema version {version}, newer than this gradindex reads ({SCHEMA_VERSION}); "
                                 "upgrade gradindex")
        data = dict(data)
        try:
            build = BuildConfig.from_dict({f.name: data.pop(f.name) for f in fields(BuildConfig) if f.name in data}, where)
            index = dict(data.pop("index"))
            index["file"] = from_dict(FileEntry, index["file"], where=where)
            data.update(
                build=build, index=from_dict(FaissEntry, index, where=where),
                factors_files=[from_dict(FileEntry, f, where=where) for f in data.pop("factors")["files"]],
                shards=[ShardRecord.from_dict(s) for s in data["shards"]],
                additions=[Addition.from_json(a, where) for a in data.get("additions", [])],
                removed=from_dict(FileEntry, data["removed"], where=where) if data.get("removed") is not None else None,
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise GradIndexError(f"{where} is incomplete or damaged ({type(e).__name__}: {e})") from None
        manifest = from_dict(cls, data, where=where)
        if rows_covered(manifest.shards) != manifest.n_rows or manifest.index.ntotal != manifest.n_rows:
            raise GradIndexError(f"{where} is damaged: its shard records and FAISS index do not hold rows 0–{manifest.n_rows - 1} once each")
        return manifest

    def summary(self, root: Path | str) -> str:
        """What ``gradindex info`` prints."""
        c, b = self.compression, self.bytes_per_sequence
        return "\n".join([
            f"index {root}: {self.n_live} sequences, model {self.build.model} ({len(self.build.layers)} layers), "
            f"generation {self.generation}, written {self.created}"
            + (f"; from {self.build.documents} documents" if self.build.documents else "")
            + (f" ({self.build.empty_documents} empty, skipped)" if self.build.empty_documents else "")
            + (f", split into windows of {self.build.max_length} tokens every {self.build.stride}" if self.build.stride else "")
            + (f"; {self.n_rows - self.build.data_rows} rows added" if self.additions else "")
            + (f"; {self.n_removed} removed (`gradindex compact` drops them)" if self.n_removed else ""),
            f"  codes: {self.code_dim} {c.dtype} values per sequence (budget {c.budget / 1024:g} KiB); "
            f"stage 1: their first {self.vector_dim} in FAISS {self.index.key}"
            + (f"; {c.factor_share:.0%} of the budget low-rank factors (blocks up to {c.factor_block})" if c.factor_share else ""),
            "  bytes per sequence: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in b.items()),
            f"  model hash {self.build.model_hash}, tokenizer hash {self.build.tokenizer_hash}, "
            f"factors sha256 {self.build.factors_hash[:16]}…",
        ])
