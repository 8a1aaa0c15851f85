"""Sinks: where labels go, and the checkpoint of every run (the ids a sink holds are done).

`open_sink(path)` picks the format from the suffix: `.jsonl` (one JSON object a line, `jsonl.py`) or
`.parquet` (a dataset directory of part files, `parquet.py`, which loads pyarrow); an `s3://` output is a
Parquet dataset on object storage (`objects.py`, `storage.py`, `lease.py`). Side files live in
`OUT.meta/` (`meta.py`). `open_sink(path, shard=...)` is one shard of a sharded output, and `open_shards`
every sink an output is made of (`layout.py` names them). A new sink format subclasses `Sink` (`base.py`)
and gets a suffix here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UsageError
from pipeline.input.shards import Shard
from pipeline.sinks.base import Sink
from pipeline.sinks.jsonl import JsonlSink
from pipeline.sinks.layout import Layout, check_layout, discover, is_jsonl
from pipeline.sinks.meta import Identity, Manifest, SinkMeta, meta_dir_for
from pipeline.sinks.storage import as_path, object_uri

__all__ = [
    "Identity",
    "JsonlSink",
    "Layout",
    "Manifest",
    "Sink",
    "SinkMeta",
    "check_layout",
    "discover",
    "meta_dir_for",
    "open_meta",
    "open_shards",
    "open_sink",
]


def open_sink(path: str | Path, shard: Shard | None = None) -> Sink:
    """The sink for an output path, chosen by suffix (.jsonl or .parquet); with `shard`, that shard of it."""
    uri = object_uri(path)
    path = as_path(path)
    if uri is not None:
        return _open_object_sink(uri, path, shard)
    if is_jsonl(path):
        return JsonlSink(path, shard)
    if path.suffix.lower() == ".parquet":
        from pipeline.sinks.parquet import ParquetSink  # noqa: PLC0415 - pyarrow is slow to import; JSONL needs none

        return ParquetSink(path, shard)
    raise UsageError(f"--output {path}: use a name ending in .jsonl or .parquet to choose the sink format.")


def _open_object_sink(uri: str, path: Path, shard: Shard | None) -> Sink:
    if path.suffix.lower() != ".parquet":
        # JSONL cannot be appended to on an object store; one object per checkpoint would be a dataset of
        # JSONL parts that no reader expects, so the Parquet dataset is the one format there.
        raise UsageError(
            f"--output {uri}: on object storage labelstream writes a Parquet dataset only. Name it with .parquet "
            "(pandas, duckdb and polars read it from the bucket), or write JSONL to a local path."
        )
    from pipeline.sinks.objects import ObjectParquetSink  # noqa: PLC0415 - pyarrow and the store's client are slow to import

    return ObjectParquetSink(path, shard)


def open_meta(path: str | Path, shard: Shard | None = None) -> SinkMeta:
    """The side files of an output (or of one shard of it), wherever it lives, without opening the sink."""
    uri = object_uri(path)
    if uri is None:
        return SinkMeta(Path(path), shard)
    from pipeline.sinks.objects import ObjectMeta  # noqa: PLC0415 - the store's client is slow to import
    from pipeline.sinks.storage import ObjectStore  # noqa: PLC0415

    return ObjectMeta(ObjectStore(uri), as_path(path), shard)


def open_shards(path: str | Path, layout: Layout | None = None) -> list[Sink]:
    """Every sink an output is made of: shards 0 … N-1 of a sharded output (started or not), else the one sink."""
    path = Path(path)
    layout = layout or discover(path)
    count = layout.count
    if count is None:
        if layout.sharded:  # shards of several N: refuse with the message a run would give
            check_layout(path, None, layout)
        return [open_sink(path)]
    return [open_sink(path, Shard(i, count)) for i in range(count)]
