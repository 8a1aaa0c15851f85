"""`labelstream export`: labels joined back onto the input rows, in input order, streamed.

The sink is read once into a compact id → label map (~18 bytes a row); the input (CSV, JSONL or Parquet)
is then streamed row by row, so a million-row export needs tens of megabytes, not the whole table. The
output's format follows `--to`'s extension: CSV (cells as text), JSONL (each input object with a label key)
or Parquet (a Parquet input keeps its column types; text inputs give string columns). Multi-label values
are a JSON list in CSV (a label may itself contain `;` or `,`) and a list in JSONL and Parquet.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import SinkError, StorageError, UsageError
from pipeline.input.ids import IdMap
from pipeline.input.location import ReadOptions, format_of, is_uri
from pipeline.input.render import render
from pipeline.input.sources import Source, input_source
from pipeline.results import Row
from pipeline.sinks import Manifest, open_shards
from pipeline.task.config import TaskConfig

_BATCH = 50_000


@dataclass(slots=True)
class ExportResult:
    """What an export wrote; `ragged` rows had more fields than the header (the extras are not exported)."""

    output: Path
    rows: int = 0
    labeled: int = 0
    ragged: int = 0
    ragged_lines: list[int] = field(default_factory=list)
    unlisted: int = 0  # JSONL rows with keys the first object lacks (not columns of a CSV or Parquet export)
    unlisted_lines: list[int] = field(default_factory=list)

    @property
    def unlabeled(self) -> int:
        """Rows written without a label."""
        return self.rows - self.labeled

    def count(self, fields: list[str], width: int, line: int, labeled: bool) -> None:
        """Count one written row."""
        self.rows += 1
        self.labeled += labeled
        if len(fields) > width:
            self.ragged += 1
            if len(self.ragged_lines) < 5:
                self.ragged_lines.append(line)


class _Labels:
    """id → label, with each distinct label value stored once."""

    def __init__(self) -> None:
        self.slots = IdMap()
        self.values: list[Any] = []
        self._index: dict[Any, int] = {}

    def add(self, row_id: str, label: Any) -> None:
        value = tuple(label) if isinstance(label, list) else label
        slot = self._index.setdefault(value, len(self.values))
        if slot == len(self.values):
            self.values.append(value)
        self.slots.set(row_id, slot)

    def get(self, row_id: str) -> Any:
        slot = self.slots.get(row_id)
        return None if slot is None else self.values[slot]


def export_labels(
    sink_path: str | Path, input_path: str | Path, to: str | Path, *, input_format: str | None = None
) -> ExportResult:
    """Write `to` (.csv, .jsonl or .parquet): every input row with a `label` added, empty where unlabeled.

    `input_format` overrides the input's extension (and the format its run recorded).
    """
    to, sink_path = Path(to), Path(sink_path)
    kind = to.suffix.lower()
    if kind not in _WRITERS:
        raise UsageError(f"--to {to}: use a name ending in .csv, .jsonl or .parquet.")
    for other, what in ((input_path, "the input"), (sink_path, "the sink")):
        if not is_uri(other) and to.resolve() == Path(other).resolve():
            raise UsageError(f"--to {to} is {what}; exporting there would overwrite it. Choose another file name.")
    sinks = open_shards(sink_path)  # a sharded output is read as one
    manifest = next((m for sink in sinks if (m := sink.meta.read_manifest()) is not None), None)
    if manifest is None:
        raise SinkError(f"{sink_path} has no manifest; export needs to know how its ids were made.")
    multi = bool(manifest.identity and manifest.identity.multi_label)
    labels = _Labels()
    for sink in sinks:
        for item in sink.iter_records(columns=["id", "label"]):
            labels.add(item["id"], item["label"])
    source = input_reader(manifest, input_path, input_format)
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    result = ExportResult(output=to)
    try:
        with source:
            column = "label" if "label" not in source.header else "labelstream_label"
            header = [*source.header, column]
            _WRITERS[kind](tmp, header, source, labels=labels, multi=multi, result=result)
            result.unlisted, result.unlisted_lines = source.unlisted, source.unlisted_lines
        tmp.replace(to)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {to}: {exc.strerror or exc}.") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return result


def input_reader(manifest: Manifest, path: str | Path, input_format: str | None = None) -> Source:
    """A reader for `path` that makes ids the way the sink's runs made them (id column or content hashes).

    The format is `input_format`, else the one the run recorded if `path` is the file it read, else by extension.
    """
    spec = manifest.input
    fmt = input_format or _recorded_format(spec, path) or format_of(str(path))
    options = ReadOptions(fmt, spec.get("encoding") or "utf-8", spec.get("delimiter") if fmt == "csv" else None)
    return input_source(path, _reading_config(manifest), options)


def _recorded_format(spec: dict[str, Any], path: str | Path) -> str | None:
    recorded, file = spec.get("format"), spec.get("file")
    if not isinstance(recorded, str) or not isinstance(file, dict):
        return None
    where = str(path) if is_uri(path) else str(Path(path).resolve())
    return recorded if file.get("path") == where else None


def _reading_config(manifest: Manifest) -> TaskConfig:
    spec = manifest.input
    return TaskConfig(
        name="export",
        instructions="",
        labels=manifest.identity.labels if manifest.identity else (),
        label_descriptions=(),
        id_column=spec.get("id_column"),
        text_column=spec.get("text_column") or "text",
        template=spec.get("template"),
        max_chars=2**31,
    )


def _csv_cell(value: Any, multi: bool) -> str:
    if value is None:
        return ""
    if multi:
        return orjson.dumps(list(value)).decode()
    return str(value)


def _valid_utf8(text: str) -> str:
    """Parquet strings must be UTF-8: undecodable input bytes become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def _padded(fields: list[str], width: int) -> list[str]:
    return (fields + [""] * width)[:width]


def _write_csv(
    path: Path, header: list[str], source: Source, *, labels: _Labels, multi: bool, result: ExportResult
) -> None:
    width = len(header) - 1
    # surrogateescape writes undecodable input bytes back exactly as they were read.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for fields, row in source.records():
            value = labels.get(row.id)
            writer.writerow([*_padded(fields, width), _csv_cell(value, multi)])
            result.count(fields, width, row.line, value is not None)


def _write_jsonl(
    path: Path, header: list[str], source: Source, *, labels: _Labels, multi: bool, result: ExportResult
) -> None:
    column, width = header[-1], len(header) - 1
    with path.open("wb") as handle:
        for obj, row in source.objects():
            value = labels.get(row.id)
            obj[column] = None if value is None else list(value) if multi else value
            handle.write(orjson.dumps(obj, default=render, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE))
            result.count([], width, row.line, value is not None)


def _write_parquet(
    path: Path, header: list[str], source: Source, *, labels: _Labels, multi: bool, result: ExportResult
) -> None:
    import pyarrow as pa  # noqa: PLC0415 - CSV exports do not pay for pyarrow
    import pyarrow.parquet as pq  # noqa: PLC0415

    label_type = pa.list_(pa.string()) if multi else pa.string()
    typed = getattr(source, "schema", None)  # a Parquet input keeps its column types
    inputs = list(typed) if typed is not None else [pa.field(name, pa.string()) for name in header[:-1]]
    schema = pa.schema([*inputs, pa.field(header[-1], label_type)])
    width = len(header) - 1

    def table(columns: Sequence[list[Any]]) -> Any:
        arrays = [pa.array(values, f.type) for values, f in zip(columns, schema, strict=True)]
        return pa.Table.from_arrays(arrays, schema=schema)

    def cells() -> Iterator[tuple[list[Any], list[str], Row]]:
        """(the cells to write, the fields as read for counting ragged rows, the Row)."""
        if typed is not None:
            for obj, row in source.objects():
                yield [obj.get(name) for name in header[:-1]], [], row
        else:
            for fields, row in source.records():
                yield [_valid_utf8(cell) for cell in _padded(fields, width)], fields, row

    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        columns: list[list[Any]] = [[] for _ in header]
        for values, fields, row in cells():
            value = labels.get(row.id)
            for i, cell in enumerate(values):
                columns[i].append(cell)
            columns[-1].append(None if value is None else list(value) if multi else value)
            result.count(fields, width, row.line, value is not None)
            if len(columns[0]) >= _BATCH:
                writer.write_table(table(columns))
                columns = [[] for _ in header]
        if columns[0] or result.rows == 0:
            writer.write_table(table(columns))


_WRITERS = {".csv": _write_csv, ".jsonl": _write_jsonl, ".ndjson": _write_jsonl, ".parquet": _write_parquet}
