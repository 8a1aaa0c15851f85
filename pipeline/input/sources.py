"""Streaming CSV/TSV (plain, gzip or zstd) → `Row`s with stable ids, one batch at a time; `input_source` picks
the reader for any input format."""

from __future__ import annotations

import codecs
import csv
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import InputError
from pipeline.input.location import InputFile, ReadOptions, check_format, format_of, open_input
from pipeline.input.rows import Source, content_id, delimiter_hint
from pipeline.results import Row
from pipeline.task.config import TaskConfig

__all__ = ["CsvSource", "Source", "content_id", "input_source"]

# A field may legitimately be megabytes long (a pasted log, a whole article); we cut the text later.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
_DELIMITERS = (",", "\t", ";", "|")


def input_source(location: str | Path, config: TaskConfig, options: ReadOptions | None = None) -> Source:
    """The reader for an input of any format (by extension, or `options.format`), not yet opened."""
    options = options or ReadOptions()
    file = open_input(location, options)
    if file.format == "parquet":
        from pipeline.input.parquet import ParquetSource  # noqa: PLC0415 - CSV runs do not pay for pyarrow.dataset

        return ParquetSource(file, config, require_id_column=options.require_id_column)
    if file.format == "jsonl":
        from pipeline.input.jsonl import JsonlSource  # noqa: PLC0415

        return JsonlSource(file, config, require_id_column=options.require_id_column)
    return CsvSource(
        file,
        config,
        encoding=options.encoding,
        delimiter=options.delimiter,
        require_id_column=options.require_id_column,
    )


class CsvSource(Source):
    """Reads a CSV (or TSV, plain or compressed) as `Row`s; opening it checks the header before any API call.

    `encoding` defaults to UTF-8 with or without a BOM; `delimiter` is guessed from the header
    when not given (comma, tab, semicolon or pipe).
    """

    def __init__(
        self,
        path: str | Path | InputFile,
        config: TaskConfig,
        *,
        encoding: str = "utf-8",
        delimiter: str | None = None,
        require_id_column: bool = False,
    ) -> None:
        file = path if isinstance(path, InputFile) else _csv_file(path)
        super().__init__(file, config, require_id_column=require_id_column)
        self.format = file.format
        self.encoding = _checked_encoding(encoding)
        self.delimiter = _checked_delimiter(delimiter)
        self._file: IO[str] | None = None
        self._reader: Any = None  # a csv reader (its type is private to the csv module)

    @property
    def lines_read(self) -> int:
        """Physical lines consumed so far, the header included (a quoted field may span several)."""
        reader = self._reader
        return int(reader.line_num) if reader is not None else 0

    def open(self) -> None:
        """Open the file (again, from the start) and validate its header; raise InputError naming the problem."""
        self._line = 0
        head = self._check_readable()
        encoding = "utf-8-sig" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding
        raw = self.file.open_stream()
        # surrogateescape: one bad byte marks one row as bad instead of stopping a million-row run.
        text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
        self._file = text
        if self.delimiter is None:
            self.delimiter = _guess_delimiter(self.file, head)
        self._reader = csv.reader(self._strip_nul(text), delimiter=self.delimiter, strict=False)
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        assert self._reader is not None  # noqa: S101 - set by open()
        try:
            header = next(self._reader, None)
        except csv.Error as exc:
            raise InputError(f"{self.path}: cannot parse the header row: {exc}") from None
        if not header or not any(h.strip() for h in header):
            raise InputError(f"{self.path}: the first line is empty; expected a header row naming the columns.")
        self.header = [h.strip() for h in header]
        self._check_columns(delimiter_hint(self.header))

    def close(self) -> None:
        """Close the underlying file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def records(self) -> Iterator[tuple[list[str], Row]]:
        """Each remaining record as (its raw fields, its Row): `export` needs both."""
        if self._reader is None:
            raise RuntimeError("CsvSource.open() must be called first")
        reader = self._reader
        while True:
            try:
                fields = next(reader, None)
            except csv.Error as exc:
                self._line += 1
                yield [], self._bad_row(f"csv:{self._line}", "unparsable_row", f"CSV parse error: {exc}")
                continue
            if fields is None:
                return
            if not fields:
                continue  # a blank line is not a record
            self._line += 1
            yield fields, self._make_row(fields)

    def _check_readable(self) -> bytes:
        head = self.file.head()
        if not head:
            raise InputError(
                f"{self.path} is empty (0 bytes); expected a header row with a {self.config.text_column!r} column."
            )
        check_format(self.file, head)
        if codecs.lookup(self.encoding).name == "utf-8":
            # Mostly undecodable bytes mean another encoding (cp949 is common for Korean files): stop now.
            # A few stray bytes in otherwise valid UTF-8 only mark their rows as bad.
            text = head.decode("utf-8", "surrogateescape")
            bad = sum(1 for ch in text[:-2] if "\udc80" <= ch <= "\udcff")
            high = sum(1 for byte in head if byte >= 0x80)
            if bad >= 3 and bad * 5 >= high:
                raise InputError(
                    f"{self.path} is not UTF-8 ({bad} undecodable bytes near the start). {_encoding_hint(head)}"
                )
        return head

    def _strip_nul(self, lines: IO[str]) -> Iterator[str]:
        for line in lines:
            if "\x00" in line:
                # csv accepts NUL, but the API does not; it is never meaningful in text.
                self.nul_bytes += line.count("\x00")
                yield line.replace("\x00", "")
            else:
                yield line


def _csv_file(path: str | Path) -> InputFile:
    return open_input(path, ReadOptions(format="tsv" if format_of(str(path)) == "tsv" else "csv"))


def _checked_encoding(encoding: str) -> str:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"unknown --encoding {encoding!r}; use e.g. utf-8, cp949, euc-kr, latin-1.") from None
    return encoding


def _checked_delimiter(delimiter: str | None) -> str | None:
    if delimiter is None:
        return None
    named = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
    delimiter = named.get(delimiter.lower(), delimiter)
    if len(delimiter) != 1 or delimiter in '\r\n"':
        raise InputError(f"--delimiter must be one character (or tab), got {delimiter!r}.")
    return delimiter


def _guess_delimiter(file: InputFile, head: bytes) -> str:
    if file.format == "tsv":
        return "\t"
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    counts = {d: first.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _encoding_hint(head: bytes) -> str:
    for guess in ("cp949", "utf-16", "latin-1"):
        try:
            head.decode(guess)
        except UnicodeDecodeError:
            continue
        if guess == "latin-1":
            break
        return f"It decodes as {guess}: re-save it as UTF-8, or pass --encoding {guess}."
    return "Re-save it as UTF-8, or pass --encoding with the file's encoding."
