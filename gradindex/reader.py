"""Reading an index's shards by global row: metadata, token ids, codes and their stage-1 prefixes, each
shard file re-hashed the first time it is read, and which rows are removed (tombstoned). Where the files
are and what they hold is ``store``'s."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GradIndexError
from .manifest import ShardRecord, rows_covered
from .store import check_hashes


class ShardReader:
    """Read access to an index's shards by global row: metadata, token ids, codes and their stage-1 prefixes.

    Shards are the given records, in row order (a build's grid, then the rows each ``add`` appended).
    Arrays are memory-mapped and only the requested rows (and prefixes) are read. With ``check``, a shard
    file is re-hashed the first time it is read (once per reader), so damage is refused, not answered.
    ``removed``: the tombstoned rows, which no answer may contain.
    """

    def __init__(self, root: Path, records: Sequence[ShardRecord], stage1_dim: int | None, *, removed: np.ndarray | None = None,
                 check: bool = True):
        self.root, self.records, self._stage1_dim = Path(root), list(records), stage1_dim
        if rows_covered(self.records) is None:
            raise GradIndexError(f"index at {root}: its shard records do not cover consecutive rows from 0")
        self.starts = np.array([r.rows[0] for r in self.records], dtype=np.int64)
        self.n_rows, self.n_shards = self.records[-1].rows[1], len(self.records)
        self.removed = np.unique(np.asarray(removed if removed is not None else [], dtype=np.int64))
        self.n_live = self.n_rows - len(self.removed)
        self._meta: dict[int, pa.Table] = {}
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._unchecked = {(j, kind): f for j, r in enumerate(self.records) for kind, f in r.files.items()} if check else {}
        self._check_lock = threading.Lock()

    def _check(self, shards, kind: str) -> None:
        with self._check_lock:  # a file is hashed once even when threads ask for it together
            check_hashes(self.root, [self._unchecked.pop((int(j), kind)) for j in shards if (int(j), kind) in self._unchecked])

    def _path(self, j: int, kind: str) -> Path:
        return self.root / self.records[j].files[kind].name

    def _shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def is_removed(self, rows: Sequence[int]) -> np.ndarray:
        """Whether each row is tombstoned (``gradindex remove``)."""
        return np.isin(np.asarray(rows, dtype=np.int64), self.removed)

    def live_rows(self) -> np.ndarray:
        """Every row not removed, ascending."""
        return np.setdiff1d(np.arange(self.n_rows, dtype=np.int64), self.removed, assume_unique=True)

    @property
    def stage1_dim(self) -> int:
        return min(self._stage1_dim or 1 << 62, self._mapped("codes")[0].shape[1])

    def meta(self, j: int) -> pa.Table:
        if j not in self._meta:
            self._check([j], "meta")
            try:
                table = pq.read_table(self._path(j, "meta"), memory_map=True)
            except Exception as e:
                raise GradIndexError(f"cannot read metadata shard {j} of {self.root}: {e}") from None
            expected = np.arange(*self.records[j].rows)
            if not np.array_equal(table.column("row_id").to_numpy(), expected):
                raise GradIndexError(f"metadata shard {j} of {self.root} does not hold rows {expected[0]}–{expected[-1]}")
            self._meta[j] = table
        return self._meta[j]

    def rows(self, rows: Sequence[int], columns: Sequence[str] = ("text", "source", "offset")) -> dict[str, list]:
        """Metadata columns of the given global rows, in the given order."""
        out: dict[str, list] = {c: [None] * len(rows) for c in columns}
        rows = self.check_rows(rows)
        shard = self._shard_of(rows)
        for j in np.unique(shard):
            where = np.nonzero(shard == j)[0]
            table = self.meta(int(j)).take(rows[where] - self.starts[j])
            for c in columns:  # shards written before windows have no start column: whole documents, start 0
                values = [0] * len(where) if c == "start" and c not in table.column_names else table.column(c).to_pylist()
                for w, v in zip(where, values):
                    out[c][w] = v
        return out

    def token_ids(self, rows: Sequence[int]) -> list[list[int]]:
        return self.rows(rows, ("input_ids",))["input_ids"]

    def self_influence(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Stored I(z, z) of the given rows (of every row when None, removed ones NaN)."""
        if rows is None:
            values = np.concatenate([self.meta(j).column("self_influence").to_numpy() for j in range(self.n_shards)])
            values[self.removed] = np.nan
            return values
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
            yield from pq.read_table(self._path(j, "meta"), columns=["text"]).column("text").to_pylist()

    def check_rows(self, rows: Sequence[int]) -> np.ndarray:
        """``rows`` as int64 row ids, refused unless every one is a row of the index."""
        rows = np.asarray(rows)
        if rows.size and (rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= self.n_rows):
            bad = (rows[(rows < 0) | (rows >= self.n_rows)][:3].tolist() if rows.dtype.kind in "iuf" else []) or rows[:3].tolist()
            raise GradIndexError(f"rows must be whole numbers from 0 to {self.n_rows - 1} (the index holds {self.n_rows}), got {bad}")
        return rows.astype(np.int64)

    def _mapped(self, kind: str) -> list[np.ndarray]:
        if kind not in self._arrays:
            self._arrays[kind] = [_map_array(self._path(j, kind)) for j in range(self.n_shards)]
        return self._arrays[kind]

    def _read(self, kind: str, rows: Sequence[int], width: int | None) -> np.ndarray:
        arrays = self._mapped(kind)
        rows = self.check_rows(rows)
        width = width or arrays[0].shape[1]
        out = np.empty((len(rows), width), dtype=arrays[0].dtype)
        shard = self._shard_of(rows)
        touched = np.unique(shard)
        self._check(touched, kind)
        for j in touched:
            where = np.nonzero(shard == j)[0]
            local = rows[where] - self.starts[j]
            order = np.argsort(local)  # ascending reads are kinder to the page cache
            _pread_rows(arrays[j], local[order], out, where[order])
        return out


def _pread_rows(array: np.memmap, rows: np.ndarray, out: np.ndarray, into: np.ndarray) -> None:
    """Rows of a C-ordered memory-mapped array read with pread into ``out[into]`` (``out``'s width of each):
    indexing the map instead leaves the kernel's read-around pages mapped, and a stage-2 read of 1,000 rows of
    64 KiB grew a query's RSS by 680 MB, not 60."""
    row_bytes, width = array.shape[1] * array.itemsize, out.shape[1] * array.itemsize
    with open(array.filename, "rb") as f:
        for position, row in zip(into.tolist(), rows.tolist()):
            out[position] = np.frombuffer(os.pread(f.fileno(), width, array.offset + row * row_bytes), dtype=array.dtype)


def _map_array(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise GradIndexError(f"cannot read {path} ({type(e).__name__}: {e}); `gradindex verify` lists every damaged file") from None
    if array.ndim != 2:
        raise GradIndexError(f"{path} holds an array of shape {array.shape}, not one code per row; the file is damaged")
    return array
