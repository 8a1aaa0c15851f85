"""Sinks: where labels go, and the checkpoint of every run (the ids a sink holds are done).

`open_sink(path)` picks the format from the suffix: `.jsonl` (one JSON object a line, `jsonl.py`) or
`.parquet` (a dataset directory of part files, `parquet.py`, which loads pyarrow). Side files live in
`OUT.meta/` (`meta.py`). A new sink format subclasses `Sink` (`base.py`) and gets a suffix here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UsageError
from pipeline.sinks.base import Sink
from pipeline.sinks.jsonl import JsonlSink
from pipeline.sinks.meta import Identity, Manifest, SinkMeta, meta_dir_for

__all__ = ["Identity", "JsonlSink", "Manifest", "Sink", "SinkMeta", "meta_dir_for", "open_sink"]


def open_sink(path: str | Path) -> Sink:
    """The sink for an output path, chosen by suffix (.jsonl or .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return JsonlSink(path)
    if suffix == ".parquet":
        from pipeline.sinks.parquet import ParquetSink  # noqa: PLC0415 - pyarrow is slow to import; JSONL needs none

        return ParquetSink(path)
    raise UsageError(f"--output {path}: use a name ending in .jsonl or .parquet to choose the sink format.")
