"""Parquet (a file or a dataset directory) → `Row`s, by record batches through `pyarrow.dataset`.

Never the whole file: a labeling run reads only the columns a Row is made of, a few thousand rows at a time
with little read-ahead, so memory stays flat however long the input is (a row group is still decoded whole,
so a file written with one huge row group costs that row group). Files of a directory are read in name order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

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
        self._pending: Iterator[tuple[list[str], dict[str, Any] | None]] = iter(())
        self._columns: list[str] = []

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
        import pyarrow as pa  # noqa: PLC0415 - CSV runs do not pay for pyarrow
        import pyarrow.dataset as ds  # noqa: PLC0415

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
        self._batches = None

    def close(self) -> None:
        """Forget the scan (safe to call twice); the next `open` starts over."""
        self._batches = None
        self._pending = iter(())

    def count_lines(self, stop: Any = None) -> int:
        """Rows in the dataset, from the files' footers (no data is read)."""
        return int(self._dataset.count_rows())

    def records(self) -> Iterator[tuple[list[str], Row]]:
        """Each remaining row as (every cell as text, its Row)."""
        for fields, _ in self._rows(full=True, typed=False):
            yield fields, self._make_row(fields)

    def objects(self) -> Iterator[tuple[dict[str, Any], Row]]:
        """Each remaining row as (column → typed value, its Row)."""
        for fields, typed in self._rows(full=True, typed=True):
            yield typed or {}, self._make_row(fields)

    def read_batch(self, size: int = 512) -> list[Row]:
        """Read up to `size` rows, decoding only the columns a Row is made of; empty when the input has ended."""
        return [self._make_row(fields) for fields, _ in itertools.islice(self._rows(full=False, typed=False), size)]

    def _rows(self, *, full: bool, typed: bool) -> Iterator[tuple[list[str], dict[str, Any] | None]]:
        import pyarrow as pa  # noqa: PLC0415

        if self._dataset is None:
            raise RuntimeError("ParquetSource.open() must be called first")
        if self._batches is None:
            # One scan per open, of every column (export) or only the ones Rows need (a run).
            self._columns = self.header if full else self.used_columns
            # Read-ahead kept small: memory is bounded by a few batches, not by the file.
            self._batches = iter(
                self._dataset.to_batches(
                    columns=self._columns, batch_size=_BATCH_ROWS, batch_readahead=2, fragment_readahead=1
                )
            )
        while True:
            for item in self._pending:
                self._line += 1
                yield item
            try:
                batch = next(self._batches, None)
            except (OSError, pa.ArrowException) as exc:
                raise self._unreadable(exc) from None
            if batch is None:
                return
            self._pending = self._split(batch, typed)

    def _split(self, batch: Any, typed: bool) -> Iterator[tuple[list[str], dict[str, Any] | None]]:
        width, index = len(self.header), self._index
        rendered = [_render_column(batch.column(i)) for i in range(batch.num_columns)]
        places = [index[name] for name in self._columns]
        values = batch.to_pylist(maps_as_pydicts="lossy") if typed else None
        for at, cells in enumerate(zip(*rendered, strict=True)):
            fields = [""] * width
            for place, cell in zip(places, cells, strict=True):
                fields[place] = cell
            yield fields, (values[at] if values is not None else None)

    def _unreadable(self, exc: BaseException) -> InputError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return InputError(
            f"cannot read {self.path} as Parquet: {reason}. If it holds another format, pass "
            "--input-format csv|tsv|jsonl; if a directory holds other files, move them out."
        )


def _render_column(column: Any) -> list[str]:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.compute as pc  # noqa: PLC0415

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return ["" if v is None else v for v in column.to_pylist()]
    if pa.types.is_float16(kind) or pa.types.is_float32(kind):
        # As a double, float32 0.1 is 0.10000000149011612; Arrow's text of it is the shortest that round-trips.
        texts = pc.cast(column, pa.string()).to_pylist()
        return ["" if t is None else render_float(float(t)) for t in texts]
    return [render(v) for v in column.to_pylist(maps_as_pydicts="lossy")]
