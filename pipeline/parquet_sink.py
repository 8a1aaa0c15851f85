"""Parquet sink: `OUT.parquet/` is a dataset directory that holds nothing but complete part files.

A Parquet file cannot be appended to and is unreadable until its footer is written, so every
checkpoint writes a new part under a temporary name in `OUT.parquet.meta/tmp/` and renames it into
the dataset directory once it is complete and synced (same filesystem, so the rename is atomic).
pandas, pyarrow.dataset, duckdb and polars can read the directory at any moment, even right after
`kill -9`: they see the parts renamed so far and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.client import Labeled
from pipeline.errors import SinkError, SinkMismatchError, StorageError, UsageError
from pipeline.idset import IdSet
from pipeline.sink import Sink

_PART = re.compile(r"^part-(\d{6})-[0-9a-f]+\.parquet$")
_FIXED_BEFORE = [("id", pa.string())]
_FIXED_AFTER = [
    ("model", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("latency_ms", pa.float32()),
    ("attempts", pa.int16()),
    ("truncated", pa.bool_()),
    ("labeled_at", pa.timestamp("ms", tz="UTC")),
]


def record_schema(carry: Sequence[str], *, multi_label: bool) -> pa.Schema:
    """The Arrow schema of a sink: typed columns in a fixed order, the same for every part and run."""
    label = pa.list_(pa.string()) if multi_label else pa.string()
    fields = [*_FIXED_BEFORE, ("label", label), *((c, pa.string()) for c in carry), *_FIXED_AFTER]
    return pa.schema([pa.field(name, kind, nullable=name != "id") for name, kind in fields])


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetSink(Sink):
    """Dataset directory of part files; see the module docstring for the crash-safety argument."""

    suffix = ".parquet"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.schema: pa.Schema | None = None
        self._next_part = 1
        self._run_tag = os.urandom(4).hex()

    def parts(self) -> list[Path]:
        """Complete part files in write order."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if _PART.match(p.name))

    def has_rows(self) -> bool:
        return bool(self.parts())

    def bind_schema(self, carry: Sequence[str], *, multi_label: bool) -> None:
        """Fix this run's schema; refuse when existing parts were written with other columns."""
        wanted = record_schema(carry, multi_label=multi_label)
        parts = self.parts()
        if parts:
            have = pq.read_schema(parts[-1])
            if not have.equals(wanted, check_metadata=False):
                raise SinkMismatchError(
                    f"{self.path} has columns {have.names} but this run would write {wanted.names} "
                    "(carry columns or multi_label changed). Use a new --output."
                )
        self.schema = wanted

    def load_done(self, *, repair: bool = True) -> IdSet:
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} is a file; a .parquet output is a dataset directory. Use a new --output.")
        if repair:
            self.recover()
        done, repeats = IdSet.bulk(self._ids())
        self.note_repeats(repeats)
        if parts := self.parts():
            self._next_part = int(_PART.match(parts[-1].name).group(1)) + 1  # type: ignore[union-attr]  # parts() only lists matches
        return done

    def _ids(self) -> Iterator[str]:
        for part in self.parts():
            try:
                ids = pq.read_table(part, columns=["id"]).column("id")
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(
                    f"{part} is not a readable Parquet part ({exc}). Move it out of {self.path} and re-run; "
                    "its rows will be labeled again."
                ) from None
            for chunk in ids.chunks:
                yield from chunk.to_pylist()

    def recover(self) -> None:
        """Finish or undo an interrupted compaction and delete temporary parts a crash left behind."""
        _recover_compaction(self)
        if self.meta.tmp_dir.is_dir():
            orphans = [p for p in self.meta.tmp_dir.iterdir() if p.name.endswith(".parquet.tmp")]
            for orphan in orphans:
                orphan.unlink(missing_ok=True)
            if orphans:
                self.notes.append(f"removed {len(orphans)} unfinished temporary part(s) left by an interrupted run")

    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        for part in self.parts():
            handle = pq.ParquetFile(part)
            for batch in handle.iter_batches(columns=list(columns) if columns else None, batch_size=8192):
                yield from batch.to_pylist()

    async def append(self, items: Sequence[Labeled]) -> None:
        if not items:
            return
        if self.schema is None:
            raise RuntimeError("bind_schema() must be called before append()")
        table = self._table(items)
        name = f"part-{self._next_part:06d}-{self._run_tag}.parquet"
        self._next_part += 1
        await self.in_io_thread(self._publish, table, name)

    def _table(self, items: Sequence[Labeled]) -> pa.Table:
        assert self.schema is not None  # noqa: S101 - checked by append
        carry = [n for n in self.schema.names if n not in {"id", "label"} and n not in dict(_FIXED_AFTER)]
        columns: dict[str, list[Any]] = {
            "id": [i.row.id for i in items],
            "label": [i.label for i in items],
            **{c: [i.row.carry.get(c) for i in items] for c in carry},
            "model": [i.model for i in items],
            "prompt_tokens": [i.prompt_tokens for i in items],
            "completion_tokens": [i.completion_tokens for i in items],
            "latency_ms": [i.latency_ms for i in items],
            "attempts": [i.attempts for i in items],
            "truncated": [i.row.truncated for i in items],
            "labeled_at": [i.labeled_at.removesuffix("Z") for i in items],
        }
        arrays = []
        for field in self.schema:
            values = columns[field.name]
            if field.name == "labeled_at":
                arrays.append(pa.array(values, pa.string()).cast(pa.timestamp("ms")).cast(field.type))
            else:
                arrays.append(pa.array(values, field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _publish(self, table: pa.Table, name: str) -> None:
        tmp = self.meta.tmp_dir / f"{name}.tmp"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.meta.tmp_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp, compression="zstd")
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            tmp.replace(self.path / name)
            fsync_dir(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(
                f"cannot write a part of {self.path}: {exc.strerror or exc}. Parts written before are complete "
                "and readable; free space and re-run the same command to resume."
            ) from None


# ---- compaction -------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes  # noqa: PLC0415 - only compaction needs it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(result == 0)


def _compaction_paths(sink: ParquetSink) -> tuple[Path, Path, Path]:
    base = sink.meta.dir
    return base / "compact.new", base / "compact.old", base / "compact.ready"


def _recover_compaction(sink: ParquetSink) -> None:
    new, old, ready = _compaction_paths(sink)
    if ready.exists() and not sink.path.exists():
        # Crashed between the two renames of the fallback swap: the new set is complete, finish the job.
        new.rename(sink.path)
        sink.notes.append("finished a compaction that was interrupted")
    elif old.exists() and not sink.path.exists():
        old.rename(sink.path)
        sink.notes.append("rolled back a compaction that was interrupted")
    ready.unlink(missing_ok=True)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def compact(path: str | Path, *, rows_per_part: int = 1_000_000) -> tuple[int, int]:
    """Merge the parts of a Parquet sink into few large ones; return (parts before, parts after).

    The new set is written beside the dataset and swapped in by one atomic directory exchange, so a
    reader, or a crash, sees either the old set or the new one: never both, never neither.
    """
    sink = ParquetSink(Path(path))
    if not sink.path.is_dir():
        raise SinkError(f"{path} is not a Parquet dataset directory.")
    sink.meta.lock()
    try:
        sink.recover()
        parts = sink.parts()
        if len(parts) <= 1:
            return len(parts), len(parts)
        new, old, ready = _compaction_paths(sink)
        new.mkdir(parents=True)
        schema = pq.read_schema(parts[0])
        written, writer, rows_in_part = 0, None, 0
        tag = os.urandom(4).hex()
        try:
            for part in parts:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=65_536):
                    if writer is None or rows_in_part >= rows_per_part:
                        if writer is not None:
                            writer.close()
                        written += 1
                        writer = pq.ParquetWriter(new / f"part-{written:06d}-{tag}.parquet", schema, compression="zstd")
                        rows_in_part = 0
                    writer.write_batch(batch)
                    rows_in_part += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        for part in new.iterdir():
            with part.open("rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(new)
        ready.touch()
        if _exchange(new, sink.path):
            ready.unlink()
            shutil.rmtree(new)  # now holds the old parts
        else:
            sink.path.rename(old)
            new.rename(sink.path)
            ready.unlink()
            shutil.rmtree(old)
        fsync_dir(sink.path.parent)
        return len(parts), written
    except OSError as exc:
        raise StorageError(f"compaction of {path} failed: {exc}. The sink is unchanged; re-run to retry.") from None
    finally:
        sink.meta.unlock()
