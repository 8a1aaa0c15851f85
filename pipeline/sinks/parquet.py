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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import SinkError, SinkMismatchError, StorageError, UsageError
from pipeline.idset import IdSet
from pipeline.results import GETTERS, LEADING, TRAILING, Labeled, sha_tag
from pipeline.sinks.base import Sink
from pipeline.sinks.files import fsync_dir
from pipeline.sinks.swap import fresh_rewrite_dir, recover_swap, swap_in

PART: Final = re.compile(r"^part-(\d{6})-[0-9a-f]+\.parquet$")
_TYPES: Final = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "int16": pa.int16(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ms", tz="UTC"),
}
# Columns a later version added: a sink written before them is upgraded by `labelstream compact`.
_ADDED_LATER: Final = frozenset({"text_sha", "confidence", "cached_tokens"})


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a logical field kind (see results.py); "list:K" is a list of K."""
    if kind.startswith("list:"):
        return pa.list_(arrow_type(kind.removeprefix("list:")))
    return _TYPES[kind]


def record_schema(carry: Sequence[str], *, multi_label: bool, outputs: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """The Arrow schema of a sink: typed columns in a fixed order, the same for every part and run.

    `outputs` are the task's extra output fields as (name, kind); they come before the carried columns.
    """
    middle = [*((name, arrow_type(kind)) for name, kind in outputs), *((c, pa.string()) for c in carry)]
    return schema_of(middle, multi_label=multi_label)


def schema_of(middle: Sequence[tuple[str, pa.DataType]], *, multi_label: bool) -> pa.Schema:
    """The record schema around the task's own columns (`middle`: extra output fields, then carried columns)."""
    label = pa.list_(pa.string()) if multi_label else pa.string()
    fields = [
        *((name, label if kind == "label" else _TYPES[kind]) for name, kind in LEADING),
        *middle,
        *((name, _TYPES[kind]) for name, kind in TRAILING),
    ]
    return pa.schema([pa.field(name, kind, nullable=name != "id") for name, kind in fields])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s layout: columns it lacks (written by an older version) become nulls."""
    arrays = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


class ParquetSink(Sink):
    """Dataset directory of part files; see the module docstring for the crash-safety argument."""

    suffix = ".parquet"
    default_checkpoint = (5000, 30.0)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.schema: pa.Schema | None = None
        self._outputs: frozenset[str] = frozenset()
        self._next_part = 1
        self._run_tag = os.urandom(4).hex()

    def parts(self) -> list[Path]:
        """Complete part files in write order."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if PART.match(p.name))

    def exists(self) -> bool:
        return self.path.exists() or self.meta.dir.exists()

    def has_rows(self) -> bool:
        return bool(self.parts())

    def bind_schema(self, carry: Sequence[str], *, multi_label: bool, outputs: Sequence[tuple[str, str]] = ()) -> None:
        """Fix this run's schema; refuse when existing parts were written with other columns."""
        wanted = record_schema(carry, multi_label=multi_label, outputs=outputs)
        parts = self.parts()
        if parts:
            have = pq.read_schema(parts[-1])
            if not have.equals(wanted, check_metadata=False):
                missing = [n for n in wanted.names if n not in have.names]
                if (
                    missing
                    and set(missing) <= _ADDED_LATER
                    and [n for n in wanted.names if n not in missing] == have.names
                ):
                    raise SinkMismatchError(
                        f"{self.path} was written by an older labelstream (no {', '.join(missing)} column). Run "
                        f"`labelstream compact {self.path}` once to upgrade it, then re-run."
                    )
                raise SinkMismatchError(
                    f"{self.path} has columns {have.names} but this run would write {wanted.names} "
                    "(carry columns, output fields or multi_label changed). Use a new --output."
                )
        self.schema = wanted
        self._outputs = frozenset(name for name, _ in outputs)

    def load_done(self, *, repair: bool = True) -> IdSet:
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{self.path} is a file; a .parquet output is a dataset directory. Use a new --output.")
        if repair:
            self.recover()
        done, repeats = IdSet.bulk(self._entries())
        self.note_repeats(repeats)
        if parts := self.parts():
            self._next_part = int(PART.match(parts[-1].name).group(1)) + 1  # type: ignore[union-attr]  # parts() only lists matches
        return done

    def _entries(self) -> Iterator[tuple[str, int]]:
        for part in self.parts():
            try:
                names = pq.read_schema(part).names
                table = pq.read_table(part, columns=[c for c in ("id", "text_sha") if c in names])
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(
                    f"{part} is not a readable Parquet part ({exc}). Move it out of {self.path} and re-run; "
                    "its rows will be labeled again."
                ) from None
            ids = table.column("id").to_pylist()
            shas = table.column("text_sha").to_pylist() if "text_sha" in names else [None] * len(ids)
            for row_id, sha in zip(ids, shas, strict=True):
                yield row_id, sha_tag(sha)

    def recover(self) -> None:
        """Finish or undo an interrupted rewrite (compaction) and delete temporary parts a crash left behind."""
        if note := recover_swap(self.path, self.meta.dir):
            self.notes.append(note)
        if self.meta.tmp_dir.is_dir():
            orphans = [p for p in self.meta.tmp_dir.iterdir() if p.name.endswith(".parquet.tmp")]
            for orphan in orphans:
                orphan.unlink(missing_ok=True)
            if orphans:
                self.notes.append(f"removed {len(orphans)} unfinished temporary part(s) left by an interrupted run")

    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        for part in self.parts():
            handle = pq.ParquetFile(part)
            present = set(handle.schema_arrow.names)
            wanted = [c for c in columns if c in present] if columns else None
            for batch in handle.iter_batches(columns=wanted, batch_size=8192):
                for item in batch.to_pylist():
                    yield item if columns is None else {c: item.get(c) for c in columns}

    def write_batch(self, items: Sequence[Labeled]) -> None:
        if self.schema is None:
            raise RuntimeError("bind_schema() must be called before append()")
        table = self._table(items)
        name = f"part-{self._next_part:06d}-{self._run_tag}.parquet"
        self._next_part += 1
        self._publish(table, name)

    def drop_ids(self, ids: IdSet) -> int:
        """Swap in a copy of the dataset without the records of `ids` (untouched parts are hard links)."""
        dropped = 0
        try:
            new = fresh_rewrite_dir(self.meta.dir)
            for part in self.parts():
                table = pq.read_table(part)
                keep = pa.array([row_id not in ids for row_id in table.column("id").to_pylist()], pa.bool_())
                removed = len(table) - pc.sum(keep).as_py() if len(table) else 0
                if not removed:
                    os.link(part, new / part.name)
                    continue
                dropped += removed
                if removed < len(table):
                    pq.write_table(table.filter(keep), new / part.name, compression="zstd")
            if dropped:
                swap_in(self.path, self.meta.dir)
        except OSError as exc:
            raise StorageError(f"cannot rewrite {self.path}: {exc.strerror or exc}. The sink is unchanged.") from None
        finally:
            recover_swap(self.path, self.meta.dir)
        return dropped

    def _table(self, items: Sequence[Labeled]) -> pa.Table:
        assert self.schema is not None  # noqa: S101 - checked by write_batch
        arrays = []
        for field in self.schema:
            name = field.name
            if name == "labeled_at":
                stamps = [i.labeled_at.removesuffix("Z") for i in items]
                arrays.append(pa.array(stamps, pa.string()).cast(pa.timestamp("ms")).cast(field.type))
            elif name in GETTERS:
                get = GETTERS[name]
                arrays.append(pa.array([get(i) for i in items], field.type))
            elif name in self._outputs:
                arrays.append(pa.array([i.extras.get(name) for i in items], field.type))
            else:  # a carried input column
                arrays.append(pa.array([i.row.carry.get(name) for i in items], field.type))
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
