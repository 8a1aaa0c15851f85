"""Streaming CSV → `Row`s with stable ids, one batch at a time, never the whole file in memory."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import sys
from collections.abc import Iterator, Mapping
from hashlib import blake2b
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from pipeline.errors import InputError
from pipeline.results import Row
from pipeline.task.config import TaskConfig

# A field may legitimately be megabytes long (a pasted log, a whole article); we cut the text later.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
_SNIFF_BYTES = 64 * 1024
_DELIMITERS = (",", "\t", ";", "|")


def content_id(text: str) -> str:
    """A stable id for a row without an id column: a 16-hex-digit hash of its text."""
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class CsvSource:
    """Reads a CSV as `Row`s; opening it checks the header before any API call is made.

    `encoding` defaults to UTF-8 with or without a BOM; `delimiter` is guessed from the header
    when not given (comma, tab, semicolon or pipe).
    """

    def __init__(
        self,
        path: str | Path,
        config: TaskConfig,
        *,
        encoding: str = "utf-8",
        delimiter: str | None = None,
        require_id_column: bool = False,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.encoding = _checked_encoding(encoding)
        self.delimiter = _checked_delimiter(delimiter)
        self.require_id_column = require_id_column
        self.header: list[str] = []
        self.id_column: str | None = None
        self.carry: tuple[str, ...] = ()
        self.missing_carry: tuple[str, ...] = ()
        self.nul_bytes = 0
        self._file: IO[str] | None = None
        self._reader: Any = None  # a csv reader (its type is private to the csv module)
        self._line = 0

    @property
    def id_source(self) -> str:
        """How ids are made: "column:<name>" or "content-hash" (recorded in the manifest)."""
        return f"column:{self.id_column}" if self.id_column else "content-hash"

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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
        raw = self.path.open("rb")
        # surrogateescape: one bad byte marks one row as bad instead of stopping a million-row run.
        text = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
        self._file = text
        if self.delimiter is None:
            self.delimiter = _guess_delimiter(self.path, head)
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
        self._check_columns()

    def close(self) -> None:
        """Close the underlying file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def batches(self, size: int = 512) -> Iterator[list[Row]]:
        """Yield lists of up to `size` rows until the file ends."""
        while batch := self.read_batch(size):
            yield batch

    def read_batch(self, size: int = 512) -> list[Row]:
        """Read up to `size` rows; an empty list means the file has ended."""
        return [row for _, row in itertools.islice(self.records(), size)]

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
        try:
            with self.path.open("rb") as f:
                head = f.read(_SNIFF_BYTES)
        except FileNotFoundError:
            raise InputError(f"input file {self.path} not found.") from None
        except IsADirectoryError:
            raise InputError(f"input {self.path} is a directory; pass a CSV file.") from None
        except OSError as exc:
            raise InputError(f"cannot read input {self.path}: {exc.strerror}.") from None
        if not head:
            raise InputError(
                f"{self.path} is empty (0 bytes); expected a header row with a {self.config.text_column!r} column."
            )
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

    def _check_columns(self) -> None:
        cfg = self.config
        missing = [c for c in cfg.template_columns if c not in self.header]
        if missing:
            what = "text column" if cfg.template is None else "template column"
            hint = ""
            if len(self.header) == 1 and any(d in self.header[0] for d in _DELIMITERS[1:]):
                hint = " The header looks like one column: pass --delimiter (e.g. --delimiter ';')."
            raise InputError(
                f"{self.path}: {what} {missing[0]!r} not found. Columns are {self.header}. "
                f"Set text_column (or template) in {cfg.source}, or pass --text-column NAME.{hint}"
            )
        if cfg.id_column and cfg.id_column in self.header:
            self.id_column = cfg.id_column
        elif cfg.id_column and self.require_id_column:
            raise InputError(
                f"{self.path}: id column {cfg.id_column!r} not found. Columns are {self.header}. "
                "Pass --id-column with one of them, or --id-column '' to use content hashes as ids."
            )
        self.carry = tuple(c for c in cfg.carry if c in self.header)
        used = {*cfg.template_columns, *self.carry, *([self.id_column] if self.id_column else [])}
        for name in sorted(used):
            if self.header.count(name) > 1:
                positions = [i + 1 for i, h in enumerate(self.header) if h == name]
                raise InputError(
                    f"{self.path}: the header names column {name!r} {len(positions)} times (columns "
                    f"{', '.join(map(str, positions))}), so it is unclear which one to use. Rename the repeats."
                )
        self.missing_carry = tuple(c for c in cfg.carry if c not in self.header)
        self._index = {name: i for i, name in enumerate(self.header)}

    def _strip_nul(self, lines: IO[str]) -> Iterator[str]:
        for line in lines:
            if "\x00" in line:
                # csv accepts NUL, but the API does not; it is never meaningful in text.
                self.nul_bytes += line.count("\x00")
                yield line.replace("\x00", "")
            else:
                yield line

    def _make_row(self, fields: list[str]) -> Row:
        cfg, idx, n = self.config, self._index, len(self.header)

        def value(column: str) -> str:
            i = idx[column]
            return fields[i] if i < len(fields) else ""

        if cfg.template is None:
            text = value(cfg.text_column)
        else:
            text = cfg.template.format_map({c: value(c) for c in cfg.template_columns})
        row_id = value(self.id_column).strip() if self.id_column else content_id(text)
        carry = {c: value(c) for c in self.carry}
        if not row_id:
            return self._bad_row(f"line:{self._line}", "missing_id", f"the {self.id_column!r} column is empty", carry)
        if len(fields) > n:
            return self._bad_row(
                row_id,
                "ragged_row",
                f"row has {len(fields)} fields but the header has {n}: an unquoted "
                f"{self.delimiter!r} inside a value? Quote the field or fix the row.",
                carry,
            )
        if _has_bad_bytes(text) or _has_bad_bytes(row_id):
            return self._bad_row(
                _safe(row_id),
                "bad_encoding",
                f"not valid {self.encoding}; fix the bytes or pass --encoding",
                carry,
            )
        if not text.strip():
            short = f" (the row has {len(fields)} of {n} fields)" if len(fields) < n else ""
            return self._bad_row(row_id, "empty_text", f"the text is empty or only whitespace{short}", carry)
        truncated = len(text) > cfg.max_chars
        if truncated:
            text = text[: cfg.max_chars]
        return Row(id=row_id, text=text, line=self._line, carry=carry, truncated=truncated)

    def _bad_row(self, row_id: str, problem: str, detail: str, carry: Mapping[str, str] | None = None) -> Row:
        return Row(id=row_id, text="", line=self._line, carry=carry or {}, problem=problem, detail=detail)


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


def _has_bad_bytes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _guess_delimiter(path: Path, head: bytes) -> str:
    if path.suffix.lower() in {".tsv", ".tab"}:
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
