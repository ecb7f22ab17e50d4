"""File primitives every artifact uses: atomic writes, content hashes, typed JSON records.

Every file gradindex writes goes through :func:`atomic_write`, so a killed process leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from .errors import GradIndexError

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; write a file or a folder there, and it replaces
    ``path`` when the block ends without an exception. On an exception nothing of it is left.

    The new bytes are fsynced before the rename and the folder after it, so after a power cut ``path``
    holds the old content or the new, and a file written later (the manifest) never survives without it."""
    path = Path(path)
    # A name of its own per writer: two processes writing the same file never share a temporary.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        for written in [tmp, *sorted(tmp.rglob("*"))] if tmp.is_dir() else [tmp]:
            # as the umask says, whatever the writing library chose (safetensors makes its files 0600: a team
            # sharing an index could not read its factors)
            os.chmod(written, (0o777 if written.is_dir() else 0o666) & ~_UMASK)
            _fsync(written)
        _fault_point(path)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot put a folder over a non-empty one
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:  # a full disk, a read-only folder, a file where a folder should be: what was there stays
        raise _cannot_write(path, e, tmp) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # nothing to remove when the folder itself could not be made
                tmp.unlink(missing_ok=True)


_WRITES = 0


def _fault_point(path: Path) -> None:
    """The crash harness's hook (``benchmarks/bench_crash.py``), inert unless its variables are set: with
    ``GRADINDEX_WRITE_LOG`` each write is logged before its rename, and with ``GRADINDEX_CRASH_AT_WRITE=n``
    the process is SIGKILLed there, at its n-th write, with the new bytes complete but not yet in place."""
    global _WRITES
    _WRITES += 1
    if log := os.environ.get("GRADINDEX_WRITE_LOG"):
        with open(log, "a") as f:
            f.write(f"{path}\n")
    if os.environ.get("GRADINDEX_CRASH_AT_WRITE") == str(_WRITES):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot_write(path: Path, e: OSError, tmp: Path | None = None) -> GradIndexError:
    """The one-line error of a failed write, naming the path in the way when it is not the one written."""
    other = e.filename and str(e.filename) not in (str(path), str(tmp))
    return GradIndexError(f"cannot write {path}: {e.strerror or type(e).__name__}" + (f" ({e.filename})" if other else ""))


@contextmanager
def writer_lock(folder: str | Path, what: str = "build") -> Iterator[None]:
    """One writer per index folder: an exclusive ``flock`` on ``folder/.lock`` (released by the kernel when
    the holder dies, so a stale lock never blocks), with the holder's pid and host in the file for the message."""
    import fcntl
    import socket

    folder = Path(folder)
    lock = folder / ".lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as e:
        raise _cannot_write(folder, e) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise GradIndexError(f"{folder} is being written by {holder}; wait for it to finish (or use another --out)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"gradindex {what} (pid {os.getpid()} on {socket.gethostname()})")
        handle.flush()
        _remove_temporaries(folder)
        yield
    finally:
        handle.close()  # releases the lock


def _remove_temporaries(folder: Path) -> None:
    """What writers killed mid-write left (an ``atomic_write`` temporary outlives a SIGKILL): with the lock held,
    no live writer owns one."""
    for tmp in sorted(folder.rglob(".*.tmp"), key=lambda p: -len(p.parts)):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(value, indent=indent))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GradIndexError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def from_dict(cls: type[T], data: dict, *, renamed: dict[str, str] | None = None, where: str = "") -> T:
    """A dataclass from its JSON form, naming any unknown or missing field instead of a TypeError.

    ``renamed`` maps field names older files used to today's names.
    """
    if not isinstance(data, dict):
        raise GradIndexError(f"{where or cls.__name__}: expected a JSON object, found {type(data).__name__}")
    data = {(renamed or {}).get(k, k): v for k, v in data.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(data.keys() - fields):
        raise GradIndexError(f"{where or cls.__name__}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise GradIndexError(f"{where or cls.__name__}: {e}") from None
