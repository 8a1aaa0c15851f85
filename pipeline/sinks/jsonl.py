"""JSONL sink: one JSON object a line, appended in synced batches; a torn last line is cut when opened."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import orjson

from pipeline.errors import SinkError, StorageError, UsageError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.results import Labeled, record, sha_tag
from pipeline.sinks.base import Sink
from pipeline.sinks.files import Appender, fsync_dir
from pipeline.sinks.layout import shard_file

# Records are written with "id" first, so the id can be read without parsing the whole line.
_ID_PREFIX: Final = re.compile(rb'^\{"id":("(?:[^"\\]|\\.)*")')
_SHA_FIELD: Final = b'"text_sha":"'
_TAIL_PROBE: Final = 1 << 16


class JsonlSink(Sink):
    """One JSON object a line, appended in batches; a torn last line is cut when opened.

    Shard i/N of `OUT.jsonl` writes `OUT.shard-i-of-N.jsonl` beside it.
    """

    suffix = ".jsonl"

    def __init__(self, path: Path, shard: Shard | None = None) -> None:
        super().__init__(path, shard)
        if shard is not None:
            self.path = shard_file(path, shard)
        self._appender = Appender(self.path)

    def exists(self) -> bool:
        return self.path.exists() or self.meta.dir.exists()

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
            done, repeats = IdSet.bulk(self._entries(handle))
        self.note_repeats(repeats)
        return done

    def _entries(self, handle: IO[bytes]) -> Iterator[tuple[str, int]]:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                return  # a torn tail (only seen when not repairing) is not a record
            row_id = _line_id(line)
            if row_id is None:
                raise SinkError(
                    f"line {number} of {self.path} is not a labelstream record. Remove that line "
                    "(or restore the file) and re-run."
                )
            yield row_id, _line_tag(line)

    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # a torn tail is not a record
                item = orjson.loads(line)
                yield item if columns is None else {c: item.get(c) for c in columns}

    def write_batch(self, items: Sequence[Labeled]) -> None:
        data = b"".join(orjson.dumps(record(item)) + b"\n" for item in items)
        try:
            self._appender.append(data)
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.path}: {exc.strerror}. Rows saved before this point are kept; "
                "free space (or fix permissions) and re-run the same command to resume."
            ) from None

    def drop_ids(self, ids: IdSet) -> int:
        """Rewrite the file without the records of `ids`, then swap it in by one rename."""
        self.meta.ensure()
        self._appender.close()
        tmp = self.meta.tmp_dir / f"{self.path.name}.rewrite.tmp"
        dropped = 0
        try:
            with self.path.open("rb") as src, tmp.open("wb") as dst:
                for line in src:
                    row_id = _line_id(line) if line.endswith(b"\n") else None
                    if row_id is not None and row_id in ids:
                        dropped += 1
                    elif row_id is not None:
                        dst.write(line)
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(f"cannot rewrite {self.path}: {exc.strerror or exc}. The sink is unchanged.") from None
        return dropped

    def release(self) -> None:
        self._appender.close()
        super().release()

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


def _line_tag(line: bytes) -> int:
    at = line.rfind(_SHA_FIELD)
    if at < 0:
        return 0
    start = at + len(_SHA_FIELD)
    return sha_tag(line[start : start + 16].decode("ascii", "replace"))
