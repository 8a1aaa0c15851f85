"""Batch request files: one line per row with the body the online engine would post, split at the API's limits.

A request line is `{"custom_id": <row id>, "method": "POST", "url": "/v1/chat/completions", "body": ...}`, the
body being `request.request_body` (so a batch asks exactly what an online request asks). A file closes when
the next line would pass `max_requests` or `max_bytes`, or asks for another model (one model per file).
Beside each file the engine keeps a rows file (id, line, text, carried columns), so results become sink
records without the input. Both are written under a temporary name and renamed once complete and synced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import orjson

from pipeline.api.request import request_body
from pipeline.errors import StorageError
from pipeline.results import Row
from pipeline.sinks.files import fsync_dir
from pipeline.task.prompt import Prompt

ENDPOINT: Final = "/v1/chat/completions"


def request_line(prompt: Prompt, row: Row, model: str) -> bytes:
    """One line of a request file (with its newline)."""
    body = request_body(prompt, row.text, model)
    return orjson.dumps({"custom_id": row.id, "method": "POST", "url": ENDPOINT, "body": body}) + b"\n"


def request_sha(prompt: Prompt, row: Row, model: str) -> str:
    """A fingerprint of the request a row sends: it changes with the text, the model and every task setting."""
    return hashlib.blake2b(request_line(prompt, row, model), digest_size=8).hexdigest()


def row_line(row: Row) -> bytes:
    """One line of a rows file: what a sink record needs of the row."""
    out = {"id": row.id, "line": row.line, "text": row.text, "carry": dict(row.carry)}
    if row.truncated:
        out["truncated"] = True
    return orjson.dumps(out) + b"\n"


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of a rows file, in the order they were written."""
    with path.open("rb") as handle:
        for line in handle:
            data = orjson.loads(line)
            yield Row(
                id=data["id"],
                text=data["text"],
                line=data["line"],
                carry=data.get("carry") or {},
                truncated=bool(data.get("truncated")),
            )


def read_row_ids(path: Path) -> Iterator[str]:
    """Only the ids of a rows file (a missing file holds none)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            yield orjson.loads(line)["id"]


@dataclass(frozen=True, slots=True)
class Written:
    """A finished request file: its number (from 1), where it is, its rows file (if kept), and what it holds."""

    number: int
    path: Path
    rows_path: Path | None
    requests: int
    bytes: int
    model: str


class _OpenFile:
    def __init__(self, number: int, path: Path, rows_path: Path | None, model: str) -> None:
        self.number, self.path, self.rows_path, self.model = number, path, rows_path, model
        self.requests = self.bytes = 0
        self.handle: IO[bytes] = _tmp(path).open("wb")
        self.rows: IO[bytes] | None = _tmp(rows_path).open("wb") if rows_path is not None else None

    def add(self, row: Row, line: bytes) -> None:
        self.handle.write(line)
        if self.rows is not None:
            self.rows.write(row_line(row))
        self.requests += 1
        self.bytes += len(line)

    def close(self) -> Written:
        for handle, path in ((self.handle, self.path), (self.rows, self.rows_path)):
            if handle is not None and path is not None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
                _tmp(path).replace(path)
        fsync_dir(self.path.parent)
        return Written(self.number, self.path, self.rows_path, self.requests, self.bytes, self.model)

    def discard(self) -> None:
        for handle, path in ((self.handle, self.path), (self.rows, self.rows_path)):
            if handle is not None and path is not None:
                handle.close()
                with contextlib.suppress(OSError):
                    _tmp(path).unlink()


class RequestFiles:
    """Writes rows into request files one after another; `add` hands back each file it completes.

    name(n) gives the n-th file's path (from 1); rows_name(n), if given, its rows file's path.
    """

    def __init__(
        self,
        prompt: Prompt,
        model: str,
        *,
        name: Callable[[int], Path],
        rows_name: Callable[[int], Path] | None = None,
        max_requests: int,
        max_bytes: int,
    ) -> None:
        self.prompt, self.model = prompt, model
        self.name, self.rows_name = name, rows_name
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.count = 0
        self._open: _OpenFile | None = None

    @property
    def pending(self) -> int:
        """Rows in the file being written."""
        return self._open.requests if self._open is not None else 0

    def add(self, row: Row) -> Written | None:
        """Add a row; returns the file this row did not fit in, now complete (else None)."""
        line = request_line(self.prompt, row, self.model)
        done = None
        current = self._open
        if current is not None and (
            current.requests >= self.max_requests
            or current.bytes + len(line) > self.max_bytes
            or current.model != self.model
        ):
            done = self._close()
        if self._open is None:
            self.count += 1
            try:
                path = self.name(self.count)
                rows = self.rows_name(self.count) if self.rows_name is not None else None
                self._open = _OpenFile(self.count, path, rows, self.model)
            except OSError as exc:
                raise StorageError(f"cannot write a request file: {exc}. Check the folder and free space.") from None
        self._open.add(row, line)
        return done

    def finish(self) -> Written | None:
        """Complete the file being written, if any."""
        return self._close() if self._open is not None else None

    def discard(self) -> None:
        """Drop the file being written (what a stop leaves unfinished)."""
        if self._open is not None:
            self._open.discard()
            self._open = None

    def _close(self) -> Written:
        assert self._open is not None  # noqa: S101 - callers check
        current, self._open = self._open, None
        try:
            return current.close()
        except OSError as exc:
            raise StorageError(f"cannot write {current.path}: {exc}. Free space and re-run.") from None


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")
