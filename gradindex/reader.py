"""Reading an index's shards by global row: metadata, token ids, codes and their stage-1 prefixes, each
shard file re-hashed the first time it is read. Where the files are and what they hold is ``store``'s."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradIndexError
from .manifest import BuildConfig, ShardRecord
from .store import check_hashes, shard_path


class ShardReader:
    """Read access to an index's shards by global row: metadata, token ids, codes and their stage-1 prefixes.

    Arrays are memory-mapped and only the requested rows (and prefixes) are read. Given the shard records, a
    shard file is re-hashed the first time it is read (once per reader), so damage is refused, not answered.
    """

    def __init__(self, root: Path, shard_size: int, n_rows: int, stage1_dim: int | None,
                 records: Sequence[ShardRecord] | None = None):
        self.root, self.shard_size, self.n_rows, self._stage1_dim = Path(root), shard_size, n_rows, stage1_dim
        self.n_shards = -(-n_rows // shard_size)
        self._meta: dict[int, pa.Table] = {}
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._unchecked = {(r.shard, kind): f for r in records for kind, f in r.files.items()} if records is not None else {}
        self._check_lock = threading.Lock()

    @classmethod
    def of(cls, root: Path, config: BuildConfig, records: Sequence[ShardRecord] | None = None) -> "ShardReader":
        return cls(root, config.shard_size, config.data_rows, config.compression.stage1_dim, records)

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
        rows = self._valid(rows)
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

    def _valid(self, rows: Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.size and (rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= self.n_rows):
            bad = (rows[(rows < 0) | (rows >= self.n_rows)][:3].tolist() if rows.dtype.kind in "iuf" else []) or rows[:3].tolist()
            raise GradIndexError(f"rows must be whole numbers from 0 to {self.n_rows - 1} (the index holds {self.n_rows}), got {bad}")
        return rows.astype(np.int64)

    def _mapped(self, kind: str) -> list[np.ndarray]:
        if kind not in self._arrays:
            self._arrays[kind] = [_map_array(shard_path(self.root, j, kind)) for j in range(self.n_shards)]
        return self._arrays[kind]

    def _read(self, kind: str, rows: Sequence[int], width: int | None) -> np.ndarray:
        arrays = self._mapped(kind)
        rows = self._valid(rows)
        width = width or arrays[0].shape[1]
        out = np.empty((len(rows), width), dtype=arrays[0].dtype)
        shard = rows // self.shard_size
        touched = np.unique(shard)
        self._check(touched, kind)
        for j in touched:
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
