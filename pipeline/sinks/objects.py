"""The Parquet sink on object storage (`s3://bucket/prefix/labels.parquet`), with the guarantees it has on disk.

    s3://b/p/labels.parquet/part-000001-<tag>.parquet        one PUT each: whole or absent, never rewritten
    s3://b/p/labels.parquet.meta/manifest.json               side objects, outside the dataset prefix
    s3://b/p/labels.parquet.meta/progress.json
    s3://b/p/labels.parquet.meta/lease.json                  the writer's lease (lease.py), instead of flock
    s3://b/p/labels.parquet.meta/dead/<ms>-<tag>-<n>.jsonl   one object per batch of dead letters

An object store has no rename and no append, but a PUT is atomic: a part is encoded in memory and sent in one
request under a name no other run uses, so a reader (or a resume after `kill -9`) sees complete parts only and
there is nothing to repair. Dead letters cannot be appended to one object without rewriting all of it at each
batch, so each batch is an object of its own, read back in name (= time) order.

What the local sink does by rewriting parts (`--relabel-changed`, compaction) is refused here for now.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.sinks.layout import PART
from pipeline.sinks.lease import LEASE_NAME, Lease
from pipeline.sinks.meta import SinkMeta, parse_dead_letters
from pipeline.sinks.parquet import ParquetSink
from pipeline.sinks.storage import ObjectStore, object_uri


class ObjectMeta(SinkMeta):
    """The `.meta/` side objects of a sink on object storage; a lease takes the place of the lock file."""

    def __init__(self, store: ObjectStore, sink_path: Path, shard: Shard | None = None) -> None:
        super().__init__(sink_path, shard)
        self.store = store
        uri = object_uri(sink_path) or str(sink_path)
        self.what = f"{uri} (shard {shard.label})" if shard else uri
        self.dead_letters_path = self.dir / "dead"
        self.lease = Lease(store, store.key(self.dir / LEASE_NAME), self.what)
        self.notes: list[str] = []
        self._tag = os.urandom(4).hex()
        self._dead_batches = 0

    @property
    def batches_dir(self) -> Path:
        """Refused: the batch engine keeps request files in a local folder beside the sink."""
        raise UsageError(
            f"--engine batch keeps its request files beside the sink, which is not possible on object storage "
            f"({self.what}) yet. Label online (the default engine), or into a local --output."
        )

    @batches_dir.setter
    def batches_dir(self, _: Path) -> None:
        pass  # SinkMeta.__init__ sets it; the getter refuses

    def ensure(self) -> None:
        """Nothing to create: an object store has no folders."""

    def lock(self) -> None:
        """Take the lease on this sink (refused, naming the holder, while another run holds it)."""
        self.notes.extend(self.lease.acquire())

    def claims(self) -> list[Path]:
        """A refused run created nothing (the lease is written only when it is granted)."""
        return []

    def unlock(self) -> None:
        """Give the lease up."""
        self.lease.release()

    def read_bytes(self, path: Path) -> bytes:
        return self.store.get(self.store.key(path))

    def write_json_atomic(self, path: Path, data: Mapping[str, Any], *, durable: bool = False) -> None:
        """Replace the side object at `path` (one PUT: atomic and, once acknowledged, durable)."""
        self.store.put(self.store.key(path), orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def append_dead_letters(self, data: bytes) -> None:
        """Write a batch of encoded dead letters as an object of its own under `dead/`."""
        self.lease.check()
        self._dead_batches += 1
        name = f"{int(time.time() * 1000):013d}-{self._tag}-{self._dead_batches:06d}.jsonl"
        self.store.put(self.store.key(self.dead_letters_path / name), data)

    def read_dead_letters(self) -> Iterator[dict[str, Any]]:
        prefix = self.store.key(self.dead_letters_path)
        for name, _ in sorted(self.store.objects(prefix)):
            if name.endswith(".jsonl"):
                yield from parse_dead_letters(self.store.get(f"{prefix}/{name}").splitlines())


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
        self.notes.extend(self.meta.notes)
        self.meta.notes.clear()
        return super().load_done(repair=repair)

    def recover(self) -> None:
        """Nothing to repair: a part is one PUT, so a crash leaves it whole or absent."""

    def drop_ids(self, ids: IdSet) -> int:
        raise UsageError(
            f"--relabel-changed on object storage ({self.meta.what}) is not supported yet: it rewrites parts. "
            "Label into a new --output, or copy the dataset to a local folder and run there."
        )

    def _publish(self, table: pa.Table, name: str) -> None:
        self.meta.lease.check()
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        self.store.put(self.store.key(self.path / name), memoryview(buffer.getvalue()))
