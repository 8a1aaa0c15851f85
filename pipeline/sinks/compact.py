"""`labelstream compact`: merge the parts of a Parquet sink into few large ones, in one atomic swap.

Compaction also upgrades parts written by an older version to the current columns (missing ones null).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SinkError, StorageError
from pipeline.sinks.parquet import ParquetSink, conform, record_schema, schema_of
from pipeline.sinks.swap import fresh_rewrite_dir, recover_swap, swap_in


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
        schema = _target_schema(parts)
        current = all(pq.read_schema(p).equals(schema, check_metadata=False) for p in parts)
        if len(parts) <= 1 and current:
            return len(parts), len(parts)
        new = fresh_rewrite_dir(sink.meta.dir)
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
                    writer.write_table(conform(pa.Table.from_batches([batch]), schema))
                    rows_in_part += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        swap_in(sink.path, sink.meta.dir)
        return len(parts), written
    except OSError as exc:
        recover_swap(sink.path, sink.meta.dir)
        raise StorageError(f"compaction of {path} failed: {exc}. The sink is unchanged; re-run to retry.") from None
    finally:
        sink.meta.unlock()


def _target_schema(parts: list[Path]) -> pa.Schema:
    """The current record schema for the columns the sink holds (the task's own columns, with their types, and the
    label type from its parts)."""
    if not parts:
        return record_schema((), multi_label=False)
    have = pq.read_schema(parts[-1])
    fixed = set(record_schema((), multi_label=False).names)
    middle = [(f.name, f.type) for f in have if f.name not in fixed]
    return schema_of(middle, multi_label=pa.types.is_list(have.field("label").type))
