"""Parquet (a file or a dataset directory) → `Row`s, by record batches.

`pyarrow.dataset` finds the files (in name order), the schema, hive partition values and the row count; each
file is then pulled a few thousand rows at a time, reading only the columns a Row is made of, so memory stays
flat however long the input is (a row group is still decoded whole: a file written as one huge row group costs
that row group).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

# This module is imported only for a Parquet input, so CSV and JSONL runs never load these.
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import InputError
from pipeline.input.location import InputFile, check_format
from pipeline.input.render import render, render_float
from pipeline.input.rows import Source
from pipeline.results import Row
from pipeline.task.config import TaskConfig

_BATCH_ROWS = 4096


class ParquetSource(Source):
    """Reads a Parquet file or dataset directory as `Row`s, rendering typed cells as `render` says."""

    format = "parquet"

    def __init__(self, file: InputFile, config: TaskConfig, *, require_id_column: bool = False) -> None:
        super().__init__(file, config, require_id_column=require_id_column)
        self._dataset: Any = None
        self._batches: Iterator[Any] | None = None
        self._columns: list[str] = []
        self._total = 0
        self._fields: list[tuple[str, ...]] = []  # the current record batch, as text cells
        self._typed: list[dict[str, Any]] | None = None  # ... and as typed values (objects() only)
        self._at = 0

    @property
    def lines_read(self) -> int:
        """Rows read so far."""
        return self._line

    @property
    def schema(self) -> Any:
        """The input's Arrow schema (export keeps its column types)."""
        return self._dataset.schema

    def open(self) -> None:
        """Open the dataset (again, from the start) and check its columns."""
        self.close()
        self._line = 0
        if not self.file.is_dir:
            check_format(self.file, self.file.head(4))
        try:
            self._dataset = ds.dataset(
                self.file.path, filesystem=self.file.filesystem, format="parquet", partitioning="hive"
            )
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(exc) from None
        self.header = list(self._dataset.schema.names)
        hint = " (the directory holds no Parquet files)" if self.file.is_dir and not self.header else ""
        self._check_columns(hint)
        try:
            # Reads every file's footer: a file that is not Parquet stops the run here, before any request.
            self._total = int(self._dataset.count_rows())
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(exc) from None
        self._batches = None

    def close(self) -> None:
        """Forget the scan (safe to call twice); the next `open` starts over."""
        self._batches = None
        self._fields, self._typed, self._at = [], None, 0

    def count_lines(self, stop: threading.Event | None = None) -> int:
        """Rows in the dataset, from the files' footers (counted when opened; no data is read)."""
        return self._total

    def records(self) -> Iterator[tuple[list[str], Row]]:
        """Each remaining row as (every cell as text, its Row)."""
        while self._fill(full=True, typed=False):
            fields, self._at = list(self._fields[self._at]), self._at + 1
            self._line += 1
            yield fields, self._make_row(fields)

    def objects(self) -> Iterator[tuple[dict[str, Any], Row]]:
        """Each remaining row as (column → typed value, its Row)."""
        while self._fill(full=True, typed=True):
            at, self._at = self._at, self._at + 1
            self._line += 1
            yield (self._typed[at] if self._typed else {}), self._make_row(self._fields[at])

    def read_batch(self, size: int = 512) -> list[Row]:
        """Read up to `size` rows, decoding only the columns a Row is made of; empty when the input has ended."""
        rows: list[Row] = []
        while len(rows) < size and self._fill(full=False, typed=False):
            take = self._fields[self._at : self._at + size - len(rows)]
            self._at += len(take)
            for fields in take:
                self._line += 1
                rows.append(self._make_row(fields))
        return rows

    def _fill(self, *, full: bool, typed: bool) -> bool:
        """Make sure rows of the current record batch remain (reading the next one if needed); False at the end."""
        if self._dataset is None:
            raise RuntimeError("ParquetSource.open() must be called first")
        if self._batches is None:
            # One scan per open, of every column (export) or only the ones Rows need (a run).
            self._columns = self.header if full else self.used_columns
            self._batches = self._scan()
        while self._at >= len(self._fields):
            try:
                batch = next(self._batches, None)
            except (OSError, pa.ArrowException) as exc:
                self._batches = iter(())
                raise self._unreadable(exc) from None
            if batch is None:
                return False
            self._fields, self._at = self._split(batch), 0
            self._typed = batch.to_pylist(maps_as_pydicts="lossy") if typed else None
        return True

    def _scan(self) -> Iterator[Any]:
        """Record batches of the scanned columns, file by file in name order, each read only when asked for.

        pyarrow.dataset finds the files, the schema and the partition values; each file is then read with
        `ParquetFile.iter_batches`, which reads nothing ahead. The dataset's own scanner reads ahead of a consumer
        as slow as a labeling run: measured peak RSS 198 MB for 200k rows and 276 MB for 1M; this reads both
        within a few MB of each other (scripts/bench_inputs.py).
        """
        import pyarrow.parquet as pq  # noqa: PLC0415 - only a scan needs the file reader

        for fragment in self._dataset.get_fragments():
            keys = ds.get_partition_keys(fragment.partition_expression) or {}
            with self.file.filesystem.open_input_file(fragment.path) as handle:
                reader = pq.ParquetFile(handle, pre_buffer=False)
                present = set(reader.schema_arrow.names)
                wanted = [c for c in self._columns if c in present and c not in keys]
                for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=wanted, use_threads=False):
                    arrays = [self._column(batch, name, keys) for name in self._columns]
                    yield pa.RecordBatch.from_arrays(arrays, names=self._columns)

    def _column(self, batch: Any, name: str, keys: dict[str, Any]) -> Any:
        """One scanned column of a file's batch, in the dataset's terms."""
        kind = self._dataset.schema.field(name).type
        if name in keys:  # a hive partition value (a `key=value` folder): the same on every row
            return pa.array([keys[name]] * batch.num_rows, kind)
        if name not in batch.schema.names:  # a file written before the column existed
            return pa.nulls(batch.num_rows, kind)
        return batch.column(name)

    def _split(self, batch: Any) -> list[tuple[str, ...]]:
        """The batch's rows as header-wide lists of text cells (columns not read stay empty)."""
        width, index = len(self.header), self._index
        rendered = [_render_column(batch.column(i)) for i in range(batch.num_columns)]
        by_place = {index[name]: cells for name, cells in zip(self._columns, rendered, strict=True)}
        empty = [""] * batch.num_rows  # columns not read (zip keeps the per-row work in C)
        return list(zip(*(by_place.get(i, empty) for i in range(width)), strict=True))

    def _unreadable(self, exc: BaseException) -> InputError:
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        return InputError(
            f"cannot read {self.path} as Parquet: {reason}. If it holds another format, pass "
            "--input-format csv|tsv|jsonl; if a directory holds other files, move them out."
        )


def _render_column(column: Any) -> list[str]:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        # Arrow writes integers as str() does; null → "" here too, in C rather than per value.
        texts = column if not pa.types.is_integer(kind) else pc.cast(column, pa.string())
        return list((texts.fill_null("") if texts.null_count else texts).to_pylist())
    if pa.types.is_float16(kind) or pa.types.is_float32(kind):
        # As a double, float32 0.1 is 0.10000000149011612; Arrow's text of it is the shortest that round-trips.
        texts = pc.cast(column, pa.string()).to_pylist()
        return ["" if t is None else render_float(float(t)) for t in texts]
    return [render(v) for v in column.to_pylist(maps_as_pydicts="lossy")]
