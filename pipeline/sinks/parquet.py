"""Parquet sink: `OUT.parquet/` is a dataset directory that holds nothing but complete part files.

A Parquet file cannot be appended to and is unreadable until its footer is written, so every
checkpoint writes a new part under a temporary name in `OUT.parquet.meta/tmp/` and renames it into
the dataset directory once it is complete and synced (same filesystem, so the rename is atomic).
pandas, pyarrow.dataset, duckdb and polars can read the directory at any moment, even right after
`kill -9`: they see the parts renamed so far and nothing else.

Shards of one output share the dataset directory; each writes parts that carry its shard in their names
(`part-s03of08-000001-<tag>.parquet`) and reads, repairs and rewrites only those.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import SinkError, SinkMismatchError, StorageError, UsageError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.results import GETTERS, LEADING, TRAILING, Labeled, sha_tag
from pipeline.sinks.base import Sink
from pipeline.sinks.files import fsync_dir
from pipeline.sinks.layout import PART, part_number, part_shard
from pipeline.sinks.swap import fresh_rewrite_dir, recover_swap, swap_in

DROP_JOURNAL: Final = "drop.json"
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
_ADDED_LATER: Final = frozenset({"text_sha", "confidence", "cached_tokens", "copied_from"})


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


def id_entries(table: pa.Table) -> Iterator[tuple[str, int]]:
    """(id, text fingerprint tag) of each record of a part, as id sets keep them (tag 0: no text_sha column)."""
    ids = table.column("id").to_pylist()
    shas = table.column("text_sha").to_pylist() if "text_sha" in table.column_names else [None] * len(ids)
    for row_id, sha in zip(ids, shas, strict=True):
        yield row_id, sha_tag(sha)


class ParquetSink(Sink):
    """Dataset directory of part files; see the module docstring for the crash-safety argument."""

    suffix = ".parquet"
    default_checkpoint = (5000, 30.0)

    def __init__(self, path: Path, shard: Shard | None = None) -> None:
        super().__init__(path, shard)
        self.schema: pa.Schema | None = None
        self._outputs: frozenset[str] = frozenset()
        self._next_part = 1
        self._run_tag = os.urandom(4).hex()
        self.filesystem: Any = None  # the pyarrow filesystem parts are read from (None: the local one)

    def locate(self, part: Path) -> str | Path:
        """Where pyarrow finds a part on `filesystem` (here the path itself; an object sink gives its key)."""
        return part

    def parts(self) -> list[Path]:
        """This sink's complete part files in write order (a shard's own parts only)."""
        return [p for p in self.all_parts() if part_shard(p.name) == self.shard]

    def all_parts(self) -> list[Path]:
        """Every complete part file in the dataset directory, of every shard."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if PART.match(p.name))

    def exists(self) -> bool:
        held = self.path.exists() if self.shard is None else bool(self.parts())
        return held or self.meta.dir.exists()

    def has_rows(self) -> bool:
        return bool(self.parts())

    def bind_schema(self, carry: Sequence[str], *, multi_label: bool, outputs: Sequence[tuple[str, str]] = ()) -> None:
        """Fix this run's schema; refuse when existing parts were written with other columns."""
        wanted = record_schema(carry, multi_label=multi_label, outputs=outputs)
        # A shard that has written nothing yet must still match its siblings: one directory, one schema.
        parts = self.parts() or self.all_parts()
        if parts:
            have = pq.read_schema(self.locate(parts[-1]), filesystem=self.filesystem)
            if have.names == [n for n in wanted.names if n != "copied_from"]:
                # Written before copies were marked: keep its columns (copies there carry no copied_from).
                wanted = pa.schema([wanted.field(n) for n in have.names], metadata=wanted.metadata)
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
            self._next_part = max(part_number(p.name) for p in parts) + 1
        return done

    def _entries(self) -> Iterator[tuple[str, int]]:
        for part in self.parts():
            try:
                names = pq.read_schema(self.locate(part), filesystem=self.filesystem).names
                table = pq.read_table(
                    self.locate(part), filesystem=self.filesystem, columns=[c for c in ("id", "text_sha") if c in names]
                )
            except (OSError, pa.ArrowException) as exc:
                raise SinkError(
                    f"{part} is not a readable Parquet part ({exc}). Move it out of {self.path} and re-run; "
                    "its rows will be labeled again."
                ) from None
            yield from id_entries(table)

    def recover(self) -> None:
        """Finish or undo an interrupted rewrite (compaction) and delete temporary parts a crash left behind."""
        if note := recover_swap(self.path, self.meta.dir):
            self.notes.append(note)
        if self._finish_drop():
            self.notes.append("finished dropping superseded records (--relabel-changed) that a crash interrupted")
        if self.meta.tmp_dir.is_dir():
            orphans = [p for p in self.meta.tmp_dir.iterdir() if p.name.endswith(".parquet.tmp")]
            for orphan in orphans:
                orphan.unlink(missing_ok=True)
            if orphans:
                self.notes.append(f"removed {len(orphans)} unfinished temporary part(s) left by an interrupted run")

    def iter_records(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        for part in self.parts():
            handle = pq.ParquetFile(self.locate(part), filesystem=self.filesystem)
            present = set(handle.schema_arrow.names)
            wanted = [c for c in columns if c in present] if columns else None
            for batch in handle.iter_batches(columns=wanted, batch_size=8192):
                for item in batch.to_pylist():
                    yield item if columns is None else {c: item.get(c) for c in columns}

    def write_batch(self, items: Sequence[Labeled]) -> None:
        if self.schema is None:
            raise RuntimeError("bind_schema() must be called before append()")
        self._publish(self._table(items), self._new_part_name())

    def _new_part_name(self) -> str:
        shard = f"{self.shard.part_tag}-" if self.shard else ""
        name = f"part-{shard}{self._next_part:06d}-{self._run_tag}.parquet"
        self._next_part += 1
        return name

    def drop_ids(self, ids: IdSet) -> int:
        """Swap in a copy of the dataset without the records of `ids` (untouched parts are hard links).

        A shard cannot swap the directory its siblings write into: it rewrites its own parts instead.
        """
        if self.shard is not None:
            return self._drop_in_own_parts(ids)
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

    def _drop_in_own_parts(self, ids: IdSet) -> int:
        """Replace each own part that holds some of `ids` by a filtered copy, through a journal.

        The filtered copies are written first; then the journal lists the parts to delete and the copies to
        publish, and `_finish_drop` (also run by the next `recover`) deletes, then publishes. A crash before
        the journal changes nothing; after it, the next run finishes the job. A reader may briefly miss the
        kept rows of a part between its deletion and its copy's rename, never see a row twice.
        """
        remove: list[str] = []
        publish: list[str] = []
        dropped = 0
        try:
            self.meta.ensure()
            for part in self.parts():
                table = pq.read_table(self.locate(part), filesystem=self.filesystem)
                keep = pa.array([row_id not in ids for row_id in table.column("id").to_pylist()], pa.bool_())
                removed = len(table) - pc.sum(keep).as_py() if len(table) else 0
                if not removed:
                    continue
                dropped += removed
                remove.append(part.name)
                if removed < len(table):
                    name = self._new_part_name()
                    self.stage(table.filter(keep), name)
                    publish.append(name)
            if remove:
                self.meta.write_json_atomic(self.meta.dir / DROP_JOURNAL, {"remove": remove, "publish": publish})
                self._finish_drop()
        except OSError as exc:
            raise StorageError(f"cannot rewrite {self.path}: {exc.strerror or exc}. Re-run to finish.") from None
        return dropped

    def stage(self, table: pa.Table, name: str) -> None:
        """Write `table` where a journal publishes it as part `name` from (a synced temporary file here)."""
        tmp = self.meta.tmp_dir / f"{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())

    def _finish_drop(self) -> bool:
        """Carry out a drop journal, if there is one (idempotent); True if there was."""
        journal = self.meta.dir / DROP_JOURNAL
        try:
            plan = orjson.loads(journal.read_bytes())
        except FileNotFoundError:
            return False
        for name in plan["remove"]:
            (self.path / name).unlink(missing_ok=True)
        for name in plan["publish"]:
            tmp = self.meta.tmp_dir / f"{name}.tmp"
            if tmp.exists():
                tmp.replace(self.path / name)
        fsync_dir(self.path)
        journal.unlink()
        return True

    def _table(self, items: Sequence[Labeled]) -> pa.Table:
        assert self.schema is not None  # noqa: S101 - checked by write_batch
        return labeled_table(items, self.schema, self._outputs)

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


def labeled_table(items: Sequence[Labeled], schema: pa.Schema, outputs: Collection[str]) -> pa.Table:
    """The sink records of `items` as a table in `schema` (`outputs`: the task's extra output field names)."""
    arrays = []
    for field in schema:
        name = field.name
        if name == "labeled_at":
            stamps = [i.labeled_at.removesuffix("Z") for i in items]
            arrays.append(pa.array(stamps, pa.string()).cast(pa.timestamp("ms")).cast(field.type))
        elif name in GETTERS:
            get = GETTERS[name]
            arrays.append(pa.array([get(i) for i in items], field.type))
        elif name in outputs:
            arrays.append(pa.array([i.extras.get(name) for i in items], field.type))
        else:  # a carried input column
            arrays.append(pa.array([i.row.carry.get(name) for i in items], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def rewrite_parts(
    parts: Sequence[str | Path],
    schema: pa.Schema,
    new: str | Path,
    *,
    rows_per_part: int,
    filesystem: Any = None,
    suffix: str = "",
) -> list[str]:
    """Write the rows of `parts` into the folder (or key prefix of `filesystem`) `new` as few large unsharded parts
    in `schema`; return their names (each written as its name plus `suffix`)."""
    names: list[str] = []
    writer, rows_in_part = None, 0
    tag = os.urandom(4).hex()
    try:
        for part in parts:
            for batch in pq.ParquetFile(part, filesystem=filesystem).iter_batches(batch_size=65_536):
                if writer is None or rows_in_part >= rows_per_part:
                    if writer is not None:
                        writer.close()
                    names.append(f"part-{len(names) + 1:06d}-{tag}.parquet")
                    where = f"{new}/{names[-1]}{suffix}"
                    writer = pq.ParquetWriter(where, schema, compression="zstd", filesystem=filesystem)
                    rows_in_part = 0
                writer.write_table(conform(pa.Table.from_batches([batch]), schema))
                rows_in_part += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return names


def target_schema(parts: Sequence[str | Path], filesystem: Any = None) -> pa.Schema:
    """The current record schema for the columns the sink holds (the task's own columns, with their types, and the
    label type from its parts)."""
    if not parts:
        return record_schema((), multi_label=False)
    have = pq.read_schema(parts[-1], filesystem=filesystem)
    fixed = set(record_schema((), multi_label=False).names)
    middle = [(f.name, f.type) for f in have if f.name not in fixed]
    return schema_of(middle, multi_label=pa.types.is_list(have.field("label").type))
