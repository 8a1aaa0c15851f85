"""`labelstream compact` on a sharded Parquet dataset on object storage: N finished shards become one sink.

The steps of `merge.py`, rebuilt for a bucket (no directory to swap), each safe to repeat, so that a crash
anywhere is finished by running `compact` again:

1. with every shard's lease held, check that all N shards finished and agree on their setup; write the
   `merging` marker object (from now on every run of the output refuses and points at `compact`) and take the
   unsharded lease;
2. copy every shard's dead-letter objects under the unsharded `dead/`, then write the merged manifest;
3. rewrite all shards' parts as unsharded ones through the rewrite journal of `objects.py` (staged under
   `.meta/tmp/`, journal, delete the old parts, copy the new ones in): a reader may miss rows for a moment,
   never sees one twice;
4. delete the shards' side objects (their leases last), then the marker.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import SinkError
from pipeline.input.shards import Shard
from pipeline.results import now_iso
from pipeline.sinks.layout import MERGING, Layout, part_shard
from pipeline.sinks.merge import check_finished, merged_manifest
from pipeline.sinks.objects import ObjectMeta, ObjectParquetSink


def merge_object_shards(path: Path, layout: Layout, *, rows_per_part: int) -> tuple[int, int]:
    """Merge a finished sharded dataset on object storage into one unsharded sink; (parts before, parts after)."""
    top = ObjectParquetSink(path)
    store = top.store
    marker = store.key(top.meta.dir / MERGING)
    count = layout.count if layout.count is not None else _recorded_count(top, marker)
    shards = [ObjectParquetSink(path, Shard(i, count), store) for i in range(count)]
    held: list[ObjectMeta] = []
    try:
        for sink in shards:
            if _objects_under(sink, sink.meta.dir):
                sink.meta.lock()  # refuses, naming the holder, while a shard's writer runs
                held.append(sink.meta)
        started, manifest = not layout.merging, None
        if started:
            check_finished(path, shards)
            manifest = merged_manifest(path, shards)
            top.meta.write_json_atomic(top.meta.dir / MERGING, {"shards": count, "started_at": now_iso()})
        top.meta.lock()
        held.append(top.meta)
        if started or top.meta.read_manifest() is None:
            _merge_dead_letters(top, shards)
            top.meta.write_manifest(manifest or merged_manifest(path, shards))
        top.recover()  # a journal an interrupted merge left: finish it first
        parts = [top.locate(p) for p in top.all_parts() if isinstance(part_shard(p.name), Shard)]
        before = len(parts) or len(top.parts())
        after = top.rewrite(parts, rows_per_part=rows_per_part) if parts else len(top.parts())
        for meta in held[:-1]:
            meta.unlock()
        for sink in shards:
            for key in _objects_under(sink, sink.meta.dir):
                store.delete(key)
        store.delete(marker)
        return before, after
    finally:
        for meta in held:
            meta.unlock()


def _recorded_count(top: ObjectParquetSink, marker: str) -> int:
    """N as the marker of an interrupted merge recorded it (the shards' own traces may be gone by then)."""
    try:
        import orjson  # noqa: PLC0415 - only a resumed merge reads the marker

        count = orjson.loads(top.store.get(marker)).get("shards")
    except (FileNotFoundError, ValueError, AttributeError):
        count = None
    if not isinstance(count, int):
        raise SinkError(f"{top.meta.what} holds shards of several sizes; it cannot be merged.")
    return count


def _objects_under(sink: ObjectParquetSink, prefix: Path) -> list[str]:
    """Every object key under `prefix` (side objects, dead letters), at any depth."""
    selector = pafs.FileSelector(sink.store.key(prefix), allow_not_found=True, recursive=True)
    try:
        infos = sink.store.fs.get_file_info(selector)
    except OSError as exc:
        raise sink.store.error(f"cannot list {prefix}", exc) from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _merge_dead_letters(top: ObjectParquetSink, shards: list[ObjectParquetSink]) -> None:
    """Copy every shard's dead-letter objects under the merged sink's `dead/` (names are unique per run)."""
    target = top.store.key(top.meta.dead_letters_path)
    for sink in shards:
        for key in _objects_under(sink, sink.meta.dead_letters_path):
            top.store.copy(key, f"{target}/{key.rsplit('/', 1)[1]}")
