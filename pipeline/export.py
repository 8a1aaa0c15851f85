"""`labelstream export`: labels joined back onto the input rows, in input order, streamed.

The sink is read once into a compact id → label map (~18 bytes a row); the input is then streamed
row by row, so a million-row export needs tens of megabytes, not the whole table.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TaskConfig
from pipeline.errors import SinkError, StorageError, UsageError
from pipeline.idset import IdMap
from pipeline.sink import open_sink
from pipeline.source import CsvSource

_BATCH = 50_000


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote."""

    rows: int
    labeled: int
    unlabeled: int
    output: Path


def export_labels(sink_path: str | Path, input_path: str | Path, to: str | Path) -> ExportResult:
    """Write `to` (.csv or .parquet): every input row with a `label` column added, empty where unlabeled."""
    to = Path(to)
    kind = to.suffix.lower()
    if kind not in {".csv", ".parquet"}:
        raise UsageError(f"--to {to}: use a name ending in .csv or .parquet.")
    sink = open_sink(sink_path)
    manifest = sink.meta.read_manifest()
    if manifest is None:
        raise SinkError(f"{sink_path} has no manifest; export needs to know how its ids were made.")
    multi = bool(manifest.get("multi_label"))
    labels, values = IdMap(), list[Any]()
    index: dict[Any, int] = {}
    for item in sink.iter_records(columns=["id", "label"]):
        value = tuple(item["label"]) if isinstance(item["label"], list) else item["label"]
        slot = index.setdefault(value, len(values))
        if slot == len(values):
            values.append(value)
        labels.set(item["id"], slot)
    source = CsvSource(input_path, _reading_config(manifest), **_reading_options(manifest))
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    try:
        with source:
            column = "label" if "label" not in source.header else "labelstream_label"
            header = [*source.header, column]
            if kind == ".csv":
                counts = _write_csv(tmp, header, source, labels=labels, values=values, multi=multi)
            else:
                counts = _write_parquet(tmp, header, source, labels=labels, values=values, multi=multi)
        tmp.replace(to)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {to}: {exc.strerror or exc}.") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    rows, labeled = counts
    return ExportResult(rows=rows, labeled=labeled, unlabeled=rows - labeled, output=to)


def _reading_config(manifest: dict[str, Any]) -> TaskConfig:
    spec = manifest.get("input") or {}
    return TaskConfig(
        name="export",
        instructions="",
        labels=tuple(manifest.get("labels") or ()),
        label_descriptions=(),
        id_column=spec.get("id_column"),
        text_column=spec.get("text_column") or "text",
        template=spec.get("template"),
        max_chars=2**31,
    )


def _reading_options(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest.get("input") or {}
    return {"encoding": spec.get("encoding") or "utf-8", "delimiter": spec.get("delimiter")}


def _label_cell(value: Any, multi: bool, *, for_csv: bool) -> Any:
    if value is None:
        return "" if for_csv else None
    if multi:
        return ";".join(value) if for_csv else list(value)
    return value


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
    path: Path, header: list[str], source: CsvSource, *, labels: IdMap, values: Sequence[Any], multi: bool
) -> tuple[int, int]:
    rows = labeled = 0
    width = len(header) - 1
    # surrogateescape writes undecodable input bytes back exactly as they were read.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for fields, row in source.records():
            slot = labels.get(row.id)
            value = values[slot] if slot is not None else None
            writer.writerow([*_padded(fields, width), _label_cell(value, multi, for_csv=True)])
            rows += 1
            labeled += slot is not None
    return rows, labeled


def _write_parquet(
    path: Path, header: list[str], source: CsvSource, *, labels: IdMap, values: Sequence[Any], multi: bool
) -> tuple[int, int]:
    import pyarrow as pa  # noqa: PLC0415 - CSV exports do not pay for pyarrow
    import pyarrow.parquet as pq  # noqa: PLC0415

    label_type = pa.list_(pa.string()) if multi else pa.string()
    schema = pa.schema([*((name, pa.string()) for name in header[:-1]), (header[-1], label_type)])
    width = len(header) - 1
    rows = labeled = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        columns: list[list[Any]] = [[] for _ in header]
        for fields, row in source.records():
            slot = labels.get(row.id)
            for i, cell in enumerate(_padded(fields, width)):
                columns[i].append(_valid_utf8(cell))
            columns[-1].append(_label_cell(values[slot] if slot is not None else None, multi, for_csv=False))
            rows += 1
            labeled += slot is not None
            if len(columns[0]) >= _BATCH:
                writer.write_table(_arrow_table(pa, columns, schema))
                columns = [[] for _ in header]
        if columns[0] or rows == 0:
            writer.write_table(_arrow_table(pa, columns, schema))
    return rows, labeled


def _arrow_table(pa: Any, columns: list[list[Any]], schema: Any) -> Any:
    arrays = [pa.array(values, field.type) for values, field in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)
