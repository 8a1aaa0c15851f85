"""`--review-below P`: the rows the model was least sure of, with their input, in a CSV beside the sink.

Written when a run ends (also a stopped one), from the whole sink, so it covers earlier runs too and never
repeats a row: every input row whose label has a confidence under P, with all its input columns, the label,
the confidence, the extra output fields and an empty `review_label` column for the reviewer. Filled in, the
file is a gold set: `labelstream eval OUT --gold OUT.review.csv --gold-column review_label`.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.analysis.export import input_reader
from pipeline.analysis.labelstudio import write_tasks
from pipeline.api.confidence import WHY_NO_CONFIDENCE
from pipeline.errors import LabelstreamError, StorageError
from pipeline.input.ids import IdMap
from pipeline.run.options import RunOptions
from pipeline.sinks import open_sink

REVIEW_COLUMN = "review_label"


def review_path(sink_path: Path) -> Path:
    """`labels.jsonl` → `labels.review.csv` (beside the sink, never inside a Parquet dataset directory)."""
    return sink_path.with_suffix(".review.csv")


@dataclass(frozen=True, slots=True)
class Review:
    """What a review file holds: rows under the threshold, and labeled rows without any confidence."""

    path: Path
    rows: int
    unknown: int


def write_review(sink_path: Path, input_path: str | Path, below: float, extras: list[str]) -> Review:
    """Write the review CSV of a sink (replacing an older one atomically); see the module docstring."""
    sink = open_sink(sink_path)
    manifest = sink.meta.read_manifest()
    if manifest is None:
        raise StorageError(f"{sink_path} has no manifest; nothing to review.")
    slots, unknown = IdMap(), 0
    values: list[dict[str, Any]] = []
    for item in sink.iter_records(columns=["id", "label", "confidence", *extras]):
        confidence = item.get("confidence")
        if confidence is None:
            unknown += 1
        elif confidence < below:
            slots.set(item["id"], len(values))
            values.append(item)
    path = review_path(sink_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with input_reader(manifest, input_path) as source, tmp.open("w", newline="", encoding="utf-8") as handle:
            column = "label" if "label" not in source.header else "labelstream_label"
            writer = csv.writer(handle)
            writer.writerow([*source.header, column, "confidence", *extras, REVIEW_COLUMN])
            for fields, row in source.records():
                slot = slots.get(row.id) if not row.problem else None
                if slot is None:
                    continue
                item = values[slot]
                cells = [_cell(item.get(name)) for name in ("label", "confidence", *extras)]
                writer.writerow([*(fields + [""] * len(source.header))[: len(source.header)], *cells, ""])
                written += 1
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}.") from None
    return Review(path=path, rows=written, unknown=unknown)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return str(value)


def note_review(opts: RunOptions, notice: IO[str]) -> None:
    """Write the review file of a run that asked for one and say where it is (a failure is a note, not an error)."""
    assert opts.review_below is not None  # noqa: S101 - only called with --review-below
    try:
        review = write_review(opts.output, opts.input, opts.review_below, [f.name for f in opts.config.outputs])
        # The same rows as Label Studio tasks, for teams that review there (labelstream label-studio-config).
        tasks = write_tasks(opts.output, opts.input, review.path.with_suffix(".json"), below=opts.review_below)
    except LabelstreamError as exc:
        print(f"labelstream: no review file: {exc.message}", file=notice)
        return
    line = (
        f"labelstream: review: {review.rows:,} rows with confidence under {opts.review_below:g} → {review.path} "
        f"(Label Studio tasks: {tasks.path})"
    )
    if review.unknown:
        line += f" ({review.unknown:,} labeled rows have no confidence: {WHY_NO_CONFIDENCE})"
    if opts.progress != "off":
        print(line, file=notice)
