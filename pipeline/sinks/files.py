"""Durable file writes shared by the sinks and their side files: append-and-sync, write-temp-then-rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import StorageError


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes, tmp_dir: Path, *, durable: bool = False) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old file or the new one, never half.

    The temporary file lives in `tmp_dir`, which must be on the same filesystem as `path`. `durable` also
    syncs the data and the rename, so that the new file survives a power cut once this returns.
    """
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        tmp.replace(path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}.") from None


class Appender:
    """Appends whole records to one file and syncs them; a failed append is cut back, never left half-written.

    A write that fails half-way (disk full) would otherwise leave a torn record in the middle of the file
    once a later append on the same handle succeeds. Not thread-safe: use it from one thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, data: bytes) -> None:
        """Append `data` and fsync; on OSError the file is as it was before the call, and the error is raised."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fd = self._fd
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.fsync(fd)
            raise

    def append_records(self, records: Sequence[bytes]) -> None:
        """Append whole records to a file that other processes may append to too (Ray actors sharing one
        dead-letter file), then fsync; on OSError the records before the failing one stay, and it is raised.

        Each record goes in one write() on an O_APPEND descriptor, so records of several writers never
        interleave. A short write (a full disk, a signal) is continued; if the rest fails, the torn record is
        cut back when nobody appended after it, else ended with a newline so that the next record stays whole
        (readers skip a line that is not JSON).
        """
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fd = self._fd
        for record in records:
            view, written = memoryview(record), 0
            try:
                while view:
                    n = os.write(fd, view)
                    view, written = view[n:], written + n
            except OSError:
                if written:
                    _cut_back(fd, written)
                raise
        os.fsync(fd)

    def close(self) -> None:
        """Close the file (appending again reopens it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _cut_back(fd: int, written: int) -> None:
    """Undo the first `written` bytes of a torn record that ends at `fd`'s offset (an O_APPEND descriptor)."""
    with contextlib.suppress(OSError):
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size == end:  # nobody appended after it: the file ends with the torn record
            os.ftruncate(fd, end - written)
        else:
            os.write(fd, b"\n")
