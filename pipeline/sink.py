"""Where labels go: an append-only sink that is also the checkpoint (the ids in it are done).

`open_sink(path)` picks the format from the suffix: `.jsonl` (one JSON object a line) or `.parquet`
(a dataset directory of part files, see `parquet_sink`). Both repair what a crash can leave behind
when they are opened, and report what they repaired in `notes`.
"""

from __future__ import annotations

import asyncio
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import aiofiles
import orjson

from pipeline.client import Failed, Labeled
from pipeline.errors import SinkError, StorageError, UsageError
from pipeline.idset import IdSet
from pipeline.meta import SinkMeta

# Records are written with "id" first, so the id can be read without parsing the whole line.
_ID_PREFIX = re.compile(rb'^\{"id":("(?:[^"\\]|\\.)*")')
_TAIL_PROBE = 1 << 16
T = TypeVar("T")


def record(item: Labeled) -> dict[str, Any]:
    """The sink record of one labeled row (field order is part of the format: `id` first)."""
    row = item.row
    return {
        "id": row.id,
        "label": item.label,
        **row.carry,
        "model": item.model,
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "latency_ms": item.latency_ms,
        "attempts": item.attempts,
        "truncated": row.truncated,
        "labeled_at": item.labeled_at,
    }


def dead_letter(item: Failed, run_id: str) -> dict[str, Any]:
    """The dead-letter record of a failed row."""
    return {
        "id": item.row.id,
        "line": item.row.line,
        "kind": item.kind,
        "message": item.message,
        "attempts": item.attempts,
        "status": item.status,
        "failed_at": item.failed_at,
        "run": run_id,
    }


class Sink(ABC):
    """Append-only store of labeled rows that knows which ids it holds."""

    suffix = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = SinkMeta(path)
        self.notes: list[str] = []
        # One thread for all of a sink's blocking writes. Spread over the default pool's threads, Arrow's and
        # glibc's per-thread heaps kept growing (measured: +37 MB RSS over 100k Parquet rows; flat with one).
        self._io: ThreadPoolExecutor | None = None

    @property
    def io(self) -> ThreadPoolExecutor:
        """The sink's single I/O thread (started on first use, again after close())."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelstream-sink")
        return self._io

    async def in_io_thread(self, work: Callable[..., T], *args: Any) -> T:
        """Run blocking `work(*args)` on the sink's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self.io, work, *args)

    @abstractmethod
    def has_rows(self) -> bool:
        """Whether the sink holds at least one record (cheap)."""

    @abstractmethod
    def load_done(self, *, repair: bool = True) -> IdSet:
        """Return the ids already in the sink, first repairing what a crash left behind (unless `repair` is off)."""

    def note_repeats(self, repeats: int) -> None:
        """Report ids the sink holds more than once (only a run with --force mixing id sources makes them)."""
        if repeats:
            self.notes.append(f"{self.path} holds {repeats} repeated ids (from a run with --force?)")

    @abstractmethod
    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every record, in write order (only `columns` when given)."""

    @abstractmethod
    async def append(self, items: Sequence[Labeled]) -> None:
        """Durably add a batch of records; raise StorageError when the disk refuses."""

    def bind_schema(self, carry: Sequence[str], *, multi_label: bool) -> None:  # noqa: B027 - optional hook
        """Fix the record layout for this run (typed sinks check it against what they hold)."""

    async def close(self) -> None:
        """Release open files and the I/O thread."""
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    async def append_dead_letters(self, items: Sequence[Failed], run_id: str) -> None:
        """Add failed rows to the dead-letter file beside the sink."""
        if not items:
            return
        data = b"".join(orjson.dumps(dead_letter(f, run_id)) + b"\n" for f in items)
        self.meta.ensure()
        await _append_bytes(self.meta.dead_letters_path, data, self.io)


class JsonlSink(Sink):
    """One JSON object a line, appended in batches; a torn last line is cut when opened."""

    suffix = ".jsonl"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._handle: Any = None

    def has_rows(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def load_done(self, *, repair: bool = True) -> IdSet:
        if not self.path.exists():
            return IdSet()
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a directory; a .jsonl output must be a file.")
        if repair:
            self._cut_torn_tail()
        with self.path.open("rb") as handle:
            done, repeats = IdSet.bulk(self._ids(handle))
        self.note_repeats(repeats)
        return done

    def _ids(self, handle: IO[bytes]) -> Iterator[str]:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                return  # a torn tail (only seen when not repairing) is not a record
            row_id = _line_id(line)
            if row_id is None:
                raise SinkError(
                    f"line {number} of {self.path} is not a labelstream record. Remove that line "
                    "(or restore the file) and re-run."
                )
            yield row_id

    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # a torn tail is not a record
                item = orjson.loads(line)
                yield item if columns is None else {c: item.get(c) for c in columns}

    async def append(self, items: Sequence[Labeled]) -> None:
        if not items:
            return
        data = b"".join(orjson.dumps(record(item)) + b"\n" for item in items)
        try:
            if self._handle is None:
                self._handle = await aiofiles.open(self.path, "ab", executor=self.io)
            await self._handle.write(data)
            await self._handle.flush()
            await self.in_io_thread(os.fsync, self._handle.fileno())
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.path}: {exc.strerror}. Rows saved before this point are kept; "
                "free space (or fix permissions) and re-run the same command to resume."
            ) from None

    async def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                await handle.close()
            except OSError as exc:
                raise StorageError(f"cannot close {self.path}: {exc.strerror}.") from None
        await super().close()

    def _cut_torn_tail(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("r+b") as handle:
            start = max(0, size - _TAIL_PROBE)
            handle.seek(start)
            tail = handle.read()
            if tail.endswith(b"\n"):
                return
            while True:
                cut = tail.rfind(b"\n")
                if cut >= 0 or start == 0:
                    break
                # A single record longer than the probe: look further back.
                start = max(0, start - _TAIL_PROBE)
                handle.seek(start)
                tail = handle.read()
            keep = start + cut + 1 if cut >= 0 else 0
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        self.notes.append(
            f"cut a torn last line ({size - keep} bytes) from {self.path}, left by an interrupted run; "
            "its row will be labeled again"
        )


def _line_id(line: bytes) -> str | None:
    match = _ID_PREFIX.match(line)
    try:
        value = orjson.loads(match.group(1)) if match else orjson.loads(line).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def _append_bytes(path: Path, data: bytes, executor: ThreadPoolExecutor) -> None:
    try:
        async with aiofiles.open(path, "ab", executor=executor) as handle:
            await handle.write(data)
            await handle.flush()
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}. Free space and re-run to resume.") from None


def open_sink(path: str | Path) -> Sink:
    """The sink for an output path, chosen by suffix (.jsonl or .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return JsonlSink(path)
    if suffix == ".parquet":
        from pipeline.parquet_sink import ParquetSink  # noqa: PLC0415 - pyarrow is slow to import, JSONL needs none

        return ParquetSink(path)
    raise UsageError(f"--output {path}: use a name ending in .jsonl or .parquet to choose the sink format.")
