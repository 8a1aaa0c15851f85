"""The Parquet sink on object storage (`s3://bucket/prefix/labels.parquet`), with the guarantees it has on disk.

    s3://b/p/labels.parquet/part-000001-<tag>.parquet        one PUT each: whole or absent, never rewritten
    s3://b/p/labels.parquet.meta/manifest.json               side objects, outside the dataset prefix
    s3://b/p/labels.parquet.meta/progress.json
    s3://b/p/labels.parquet.meta/lease.json                  the writer's lease (lease.py), instead of flock
    s3://b/p/labels.parquet.meta/dead/<ms>-<tag>-<n>.jsonl   one object per batch of dead letters
    s3://b/p/labels.parquet.meta/batches.json                --engine batch: its record (batches/: rows files)
    s3://b/p/labels.parquet.meta/staging/<run id>/           --engine ray: parts to commit (staging.py)

An object store has no rename and no append, but a PUT is atomic: a part is encoded in memory and sent in one
request under a name no other run uses, so a reader (or a resume after `kill -9`) sees complete parts only and
there is nothing to repair. Dead letters cannot be appended to one object without rewriting all of it at each
batch, so each batch is an object of its own, read back in name (= time) order.

Rewrites (`--relabel-changed`, compaction) stage their new parts under `.meta/tmp/`, then follow a journal
(`.meta/drop.json`): delete the old parts, copy the new ones in, so no reader ever sees a row twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import SinkError, StorageError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.results import Failed, encode_dead_letters
from pipeline.sinks.layout import PART
from pipeline.sinks.lease import LEASE_NAME, Lease
from pipeline.sinks.meta import SinkMeta, parse_dead_letters
from pipeline.sinks.parquet import DROP_JOURNAL, ParquetSink, conform, rewrite_parts, target_schema
from pipeline.sinks.staging import STAGING, commit_staged
from pipeline.sinks.storage import ObjectStore, object_uri


class ObjectMeta(SinkMeta):
    """The `.meta/` side objects of a sink on object storage; a lease takes the place of the lock file."""

    def __init__(self, store: ObjectStore, sink_path: Path, shard: Shard | None = None) -> None:
        super().__init__(sink_path, shard)
        self.store = store
        uri = object_uri(sink_path) or str(sink_path)
        self.what = f"{uri} (shard {shard.label})" if shard else uri
        self.dead_letters_path = self.dir / "dead"
        self.staging_dir = self.dir / STAGING  # parts of writers without the lease, for the holder to commit
        self.lease = Lease(store, store.key(self.dir / LEASE_NAME), self.what)
        self.notes: list[str] = []
        self._tag = os.urandom(4).hex()
        self._dead_batches = 0
        self._progress = LatestWins(store)
        self._work: Path | None = None

    @property
    def batches_dir(self) -> Path:
        """A local work folder for the batch engine's request, rows and result files (made on first use, removed at
        unlock). The rows files, which resume depends on, are kept on the bucket as well (`keep_batch_file`)."""
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="labelstream-batches-"))
        return self._work

    @batches_dir.setter
    def batches_dir(self, _: Path) -> None:
        pass  # SinkMeta.__init__ sets it; the folder is made on first use

    def keep_batch_file(self, path: Path) -> None:
        """Send a finished file to `.meta/batches/` (one upload: it appears whole), where any later run finds it."""
        self.lease.check()
        try:
            pafs.copy_files(str(path), self._kept(path), destination_filesystem=self.store.fs)
        except OSError as exc:
            raise self.store.error(f"cannot write {self.store.uri_of(self._kept(path))}", exc) from None

    def fetch_batch_file(self, path: Path) -> bool:
        """Download a kept file into the work folder unless it is there; False when it is on neither."""
        if path.exists():
            return True
        key = self._kept(path)
        try:
            if self.store.fs.get_file_info(key).type != pafs.FileType.File:
                return False
            tmp = path.with_name(f".{path.name}.tmp")
            pafs.copy_files(key, str(tmp), source_filesystem=self.store.fs)
        except OSError as exc:
            raise self.store.error(f"cannot read {self.store.uri_of(key)}", exc) from None
        tmp.replace(path)
        return True

    def drop_batch_file(self, path: Path) -> None:
        """Delete a file of the work folder and its kept copy on the bucket."""
        path.unlink(missing_ok=True)
        self.lease.check()
        self.store.delete(self._kept(path))

    def batch_file_names(self) -> set[str]:
        """The names in the work folder and under `.meta/batches/`."""
        kept = {name for name, _ in self.store.objects(self.store.key(self.dir / "batches"))}
        return kept | super().batch_file_names()

    def _kept(self, path: Path) -> str:
        return self.store.key(self.dir / "batches" / path.name)

    def ensure(self) -> None:
        """Nothing to create: an object store has no folders."""

    def lock(self) -> None:
        """Take the lease on this sink (refused, naming the holder, while another run holds it)."""
        self.notes.extend(self.lease.acquire())

    def claims(self) -> list[Path]:
        """A refused run created nothing (the lease is written only when it is granted)."""
        return []

    def unlock(self) -> None:
        """Send the last progress file, then give the lease up."""
        self._progress.flush()
        self.lease.release()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def read_bytes(self, path: Path) -> bytes:
        return self.store.get(self.store.key(path))

    def write_json_atomic(self, path: Path, data: Mapping[str, Any], *, durable: bool = False) -> None:
        """Replace the side object at `path` (one PUT: atomic and, once acknowledged, durable).

        The progress file is rewritten every second from the event loop; a PUT there would stall the loop for a
        round trip to the store each time, so it goes out on a thread of its own instead (the latest wins).
        """
        body = orjson.dumps(data, option=orjson.OPT_INDENT_2)
        if path == self.progress_path and not durable:
            self._progress.send(self.store.key(path), body)
        else:
            self.lease.check()  # the manifest and the batch record: never written once another run may hold it
            self.store.put(self.store.key(path), body)

    def append_dead_letters(self, items: Sequence[Failed], run_id: str) -> None:
        """Write the dead letters of a batch of failed rows as an object of its own under `dead/`."""
        if not items:
            return
        self.lease.check()
        self._dead_batches += 1
        put_dead_letters(self.store, self.dead_letters_path, items, run_id, tag=self._tag, number=self._dead_batches)

    def read_dead_letters(self) -> Iterator[dict[str, Any]]:
        prefix = self.store.key(self.dead_letters_path)
        for name, _ in sorted(self.store.objects(prefix)):
            if name.endswith(".jsonl"):
                yield from parse_dead_letters(self.store.get(f"{prefix}/{name}").splitlines())


def put_dead_letters(
    store: ObjectStore, where: Path, items: Sequence[Failed], run_id: str, *, tag: str, number: int
) -> None:
    """One object of dead letters under `where` (`dead/`), named by time, then writer and count, so none collide;
    also for writers without the lease (Ray actors): a dead letter is a record of a failure, never a row."""
    name = f"{int(time.time() * 1000):013d}-{tag}-{number:06d}.jsonl"
    store.put(store.key(where / name), b"".join(encode_dead_letters(items, run_id)))


class LatestWins:
    """Puts objects on a thread of its own; an object rewritten before its last version went out is sent once,
    as its latest version. Failures are dropped: it carries the progress file, a convenience, not a record."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._pending: dict[str, bytes] = {}
        self._idle = threading.Condition()
        self._busy = False
        self._running = False  # set and cleared under the lock, so a send never relies on a thread on its way out

    def send(self, key: str, body: bytes) -> None:
        """Queue `body` for `key` (replacing a version not yet sent) and return at once."""
        with self._idle:
            self._pending[key] = body
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="labelstream-progress", daemon=True).start()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait (up to `timeout` seconds) until everything queued has been sent."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending and not self._busy, timeout=timeout)

    def _run(self) -> None:
        while True:
            with self._idle:
                if not self._pending:
                    self._running = False
                    self._idle.notify_all()
                    return
                key, body = self._pending.popitem()
                self._busy = True
            with contextlib.suppress(StorageError):
                self.store.put(key, body)
            with self._idle:
                self._busy = False


class ObjectParquetSink(ParquetSink):
    """A Parquet dataset under an object-store prefix: parts are whole objects, side files `.meta/` objects."""

    def __init__(self, path: Path, shard: Shard | None = None, store: ObjectStore | None = None) -> None:
        super().__init__(path, shard)
        uri = object_uri(path)
        if uri is None:
            raise ValueError(f"not an object-store location: {path}")
        self.store = store or ObjectStore(uri)
        self.meta: ObjectMeta = ObjectMeta(self.store, path, shard)
        self.filesystem = self.store.fs

    def locate(self, part: Path) -> str:
        return self.store.key(part)

    def all_parts(self) -> list[Path]:
        names = [name for name, _ in self.store.objects(self.store.key(self.path)) if PART.match(name)]
        return [self.path / name for name in sorted(names)]

    def exists(self) -> bool:
        held = bool(self.all_parts()) if self.shard is None else bool(self.parts())
        return held or bool(self.store.objects(self.store.key(self.meta.dir)))

    def load_done(self, *, repair: bool = True) -> IdSet:
        """The ids of complete parts; a run (`repair`) first commits what dead --engine ray runs left staged."""
        self.notes.extend(self.meta.notes)
        self.meta.notes.clear()
        done = super().load_done(repair=repair)
        if repair and self.shard is None:  # a Ray run is never sharded
            committed, dropped = self.commit_staged(done)
            if committed or dropped:
                self.notes.append(
                    f"committed {committed:,} rows an earlier --engine ray run had staged ({dropped:,} rows already in "
                    "the output were dropped)"
                )
        return done

    def commit_staged(self, done: IdSet, run_id: str | None = None) -> tuple[int, int]:
        """Move the rows of parts staged by `run_id` (default: by any run) into the dataset unless `done` holds their
        ids (see staging.py); returns (rows committed, rows dropped). Only the lease holder may call it: a reader
        that committed beside a live Ray run could save its rows twice."""
        if not self.meta.lease.held:
            raise SinkError(f"{self.meta.what}: staged parts are committed only by the run that holds the lease.")
        self.meta.lease.check()
        return commit_staged(self.store, self.meta.staging_dir, done, self._publish_new, run_id)

    def _publish_new(self, table: pa.Table) -> None:
        # In the sink's layout (a writer of another make may differ in nullability or column order); before the
        # run binds its schema, in the layout of the dataset's newest part.
        schema = self.schema
        if schema is None and (parts := self.all_parts()):
            schema = pq.read_schema(self.locate(parts[-1]), filesystem=self.filesystem)
        self._publish(table if schema is None else conform(table, schema), self._new_part_name())

    def recover(self) -> None:
        """Finish a rewrite a crash interrupted (its journal says what), and delete parts staged for none.

        A part itself needs no repair: it is one PUT, so a crash leaves it whole or absent.
        """
        if self._finish_drop():
            self.notes.append("finished a rewrite of parts (compaction or --relabel-changed) that a crash interrupted")
        staged = [name for name, _ in self.store.objects(self.store.key(self.meta.tmp_dir)) if name.endswith(".tmp")]
        for name in staged:
            self.store.delete(self.store.key(self.meta.tmp_dir / name))
        if staged:
            self.notes.append(f"removed {len(staged)} staged part(s) left by an interrupted rewrite")

    def drop_ids(self, ids: IdSet) -> int:
        """Rewrite the parts that hold some of `ids` through the journal (no directory to swap on a store)."""
        return self._drop_in_own_parts(ids)

    def compact(self, *, rows_per_part: int) -> tuple[int, int]:
        """Rewrite the parts as few large ones (`rewrite`); return (parts before, parts after)."""
        self.recover()
        parts = [self.locate(p) for p in self.parts()]
        schema = target_schema(parts, self.filesystem)
        current = all(pq.read_schema(p, filesystem=self.filesystem).equals(schema, check_metadata=False) for p in parts)
        if len(parts) <= 1 and current:
            return len(parts), len(parts)
        return len(parts), self.rewrite(parts, rows_per_part=rows_per_part)

    def rewrite(self, parts: list[str], *, rows_per_part: int) -> int:
        """Replace `parts` (keys, of any shard) by few large unsharded ones through the journal; return how many.

        The new parts are staged under `.meta/tmp/`; then the journal is written, the old parts deleted and the
        new ones copied in (a server-side copy: whole or absent). A reader may miss rows for the moments between,
        never see one twice; a crash leaves the journal, which the next run or compaction finishes.
        """
        self.meta.lease.check()
        staged_in = self.store.key(self.meta.tmp_dir)
        schema = target_schema(parts, self.filesystem)
        names = rewrite_parts(
            parts, schema, staged_in, rows_per_part=rows_per_part, filesystem=self.filesystem, suffix=".tmp"
        )
        plan = {"remove": [p.rsplit("/", 1)[1] for p in parts], "publish": names}
        self.meta.write_json_atomic(self.meta.dir / DROP_JOURNAL, plan)
        self._finish_drop()
        return len(names)

    def stage(self, table: pa.Table, name: str) -> None:
        self.meta.lease.check()
        self.store.put(self.store.key(self.meta.tmp_dir / f"{name}.tmp"), _encoded(table))

    def _finish_drop(self) -> bool:
        journal = self.meta.dir / DROP_JOURNAL
        try:
            plan = orjson.loads(self.meta.read_bytes(journal))
        except FileNotFoundError:
            return False
        for name in plan["remove"]:
            self.store.delete(self.store.key(self.path / name))
        for name in plan["publish"]:
            staged = self.store.key(self.meta.tmp_dir / f"{name}.tmp")
            if self.store.copy(staged, self.store.key(self.path / name)):
                self.store.delete(staged)
        self.store.delete(self.store.key(journal))
        return True

    def _publish(self, table: pa.Table, name: str) -> None:
        self.meta.lease.check()
        self.store.put(self.store.key(self.path / name), _encoded(table))


def _encoded(table: pa.Table) -> memoryview:
    """A part as the bytes of one PUT (zstd, like parts on disk)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    return memoryview(buffer.getvalue())


def compact_objects(path: Path, *, rows_per_part: int) -> tuple[int, int]:
    """`labelstream compact` for an unsharded Parquet dataset on object storage, under the writer's lease (a
    sharded one is merged into one sink by `merge_objects.py`)."""
    sink = ObjectParquetSink(path)
    if not sink.exists():
        raise SinkError(f"{sink.meta.what} holds no parts to compact.")
    sink.meta.lock()
    try:
        sink.recover()  # first: a compaction killed between its deletes and its copies left the parts in its journal
        if not sink.all_parts():
            raise SinkError(f"{sink.meta.what} holds no parts to compact.")
        return sink.compact(rows_per_part=rows_per_part)
    finally:
        sink.meta.unlock()
