"""`labelstream compact`: merge the parts of a Parquet sink into few large ones, in one atomic swap.

Compaction also upgrades parts written by an older version to the current columns (missing ones null).
A finished sharded dataset becomes one ordinary sink (`merge.py`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import SinkError, StorageError
from pipeline.sinks.layout import discover
from pipeline.sinks.merge import merge_shards
from pipeline.sinks.parquet import ParquetSink, rewrite_parts, target_schema
from pipeline.sinks.storage import as_path, object_uri
from pipeline.sinks.swap import fresh_rewrite_dir, recover_swap, swap_in


def compact(path: str | Path, *, rows_per_part: int = 1_000_000) -> tuple[int, int]:
    """Merge the parts of a Parquet sink into few large ones; return (parts before, parts after).

    The new set is written beside the dataset and swapped in by one atomic directory exchange, so a
    reader, or a crash, sees either the old set or the new one: never both, never neither.
    """
    if object_uri(path) is not None:
        # The store's clients load only for these.
        from pipeline.sinks.merge_objects import merge_object_shards  # noqa: PLC0415
        from pipeline.sinks.objects import compact_objects  # noqa: PLC0415

        layout = discover(as_path(path))
        if layout.sharded or layout.merging:
            return merge_object_shards(as_path(path), layout, rows_per_part=rows_per_part)
        return compact_objects(as_path(path), rows_per_part=rows_per_part)
    layout = discover(Path(path))
    if layout.sharded or layout.merging:
        return merge_shards(Path(path), layout, rows_per_part=rows_per_part)
    sink = ParquetSink(Path(path))
    if not sink.path.is_dir():
        raise SinkError(f"{path} is not a Parquet dataset directory.")
    sink.meta.lock()
    try:
        sink.recover()
        parts = sink.parts()
        schema = target_schema(parts)
        current = all(pq.read_schema(p).equals(schema, check_metadata=False) for p in parts)
        if len(parts) <= 1 and current:
            return len(parts), len(parts)
        written = len(rewrite_parts(parts, schema, fresh_rewrite_dir(sink.meta.dir), rows_per_part=rows_per_part))
        swap_in(sink.path, sink.meta.dir)
        return len(parts), written
    except OSError as exc:
        recover_swap(sink.path, sink.meta.dir)
        raise StorageError(f"compaction of {path} failed: {exc}. The sink is unchanged; re-run to retry.") from None
    finally:
        sink.meta.unlock()
