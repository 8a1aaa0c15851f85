"""What every sink does: append records durably, know which ids it holds (the resume point), keep side files.

A sink does its blocking I/O on one thread of its own (`in_io_thread`), so the event loop never waits on
the disk and per-thread allocator heaps stay few.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.results import Failed, Labeled
from pipeline.sinks.meta import SinkMeta

T = TypeVar("T")
# Seconds a cancelled append waits for its write to end (a stuck disk must not hold a hard stop for ever).
CANCEL_WAIT = 10.0


class Sink(ABC):
    """Append-only store of labeled rows that knows which ids it holds.

    `output` is the path the user named; `path` is what this sink writes (for shard i/N of a JSONL output, its
    own file beside the others). A shard keeps its side files in a folder of its own.
    """

    suffix = ""
    default_checkpoint: tuple[int, float] = (1000, 2.0)  # rows, seconds between writes

    def __init__(self, path: Path, shard: Shard | None = None) -> None:
        self.output = path
        self.shard = shard
        self.path = path
        self.meta = SinkMeta(path, shard)
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
    def exists(self) -> bool:
        """Whether anything of the sink is on disk (the sink itself or its side files)."""

    @abstractmethod
    def has_rows(self) -> bool:
        """Whether the sink holds at least one record (cheap)."""

    @abstractmethod
    def load_done(self, *, repair: bool = True) -> IdSet:
        """The ids in the sink, tagged with their text fingerprints; first repairs what a crash left (unless not
        `repair`)."""

    def note_repeats(self, repeats: int) -> None:
        """Report ids the sink holds more than once (only a run with --force mixing id sources makes them)."""
        if repeats:
            self.notes.append(f"{self.path} holds {repeats} repeated ids (from a run with --force?)")

    @abstractmethod
    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every record, in write order (only `columns` when given)."""

    @abstractmethod
    def write_batch(self, items: Sequence[Labeled]) -> None:
        """Durably add a batch of records (blocking); raise StorageError when the disk refuses."""

    @abstractmethod
    def drop_ids(self, ids: IdSet) -> int:
        """Remove the records of `ids` in one atomic step (blocking); return how many were removed."""

    def bind_schema(  # noqa: B027 - optional hook
        self, carry: Sequence[str], *, multi_label: bool, outputs: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Fix the record layout for this run (typed sinks check it against what they hold); `outputs` are the
        task's extra output fields as (name, logical kind)."""

    async def append(self, items: Sequence[Labeled], *, saved: Callable[[int], None] | None = None) -> None:
        """Durably add a batch of records on the I/O thread; then `saved(len(items))`.

        Cancelling the caller cannot stop a write the thread has begun, so the cancellation waits (up to
        `CANCEL_WAIT` seconds) for it to end and still reports the rows as saved: the caller's count then matches
        what the sink holds. A failed write raises its own error; a stuck one, or a second cancellation (a hard
        stop), gives up waiting at once and reports nothing.
        """
        if not items:
            return
        write = asyncio.get_running_loop().run_in_executor(self.io, self.write_batch, items)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            done, _ = await asyncio.wait([write], timeout=CANCEL_WAIT)
            if done and write.exception() is None and saved is not None:
                saved(len(items))
            raise
        if saved is not None:
            saved(len(items))

    async def append_dead_letters(self, items: Sequence[Failed], run_id: str) -> None:
        """Add failed rows to the dead-letter file beside the sink."""
        if items:
            await self.in_io_thread(self.meta.append_dead_letters, items, run_id)

    def release(self) -> None:
        """Close open files (blocking)."""
        self.meta.close()

    async def close(self) -> None:
        """Release open files and the I/O thread."""
        if self._io is not None:
            await self.in_io_thread(self.release)
            self._io.shutdown(wait=True)
            self._io = None
        else:
            self.release()
