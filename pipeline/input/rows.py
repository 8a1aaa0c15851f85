"""What every input format shares: the task file's column rules, turning a record's cells into a `Row`, batching.

A format reader (CSV, JSONL, Parquet) only finds the header and yields each record's cells as text (typed
values rendered by `render`); the id column or content hash, the text column or template, carry, max_chars and
the problem rows (empty text, missing id, bad bytes) are decided here, once, so every format agrees.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from hashlib import blake2b
from types import TracebackType
from typing import Any, Self

from pipeline.errors import InputError
from pipeline.input.location import InputFile
from pipeline.results import Row
from pipeline.task.config import TaskConfig

_DELIMITERS = (",", "\t", ";", "|")


def content_id(text: str) -> str:
    """A stable id for a row without an id column: a 16-hex-digit hash of its text."""
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class Source(ABC):
    """Reads an input as `Row`s; opening it checks the columns before any API call is made."""

    format = "csv"
    encoding = "utf-8"
    delimiter: str | None = None

    def __init__(self, file: InputFile, config: TaskConfig, *, require_id_column: bool = False) -> None:
        self.file = file
        self.path = file.name
        self.config = config
        self.require_id_column = require_id_column
        self.header: list[str] = []
        self.id_column: str | None = None
        self.carry: tuple[str, ...] = ()
        self.missing_carry: tuple[str, ...] = ()
        self.nul_bytes = 0
        # Records with cells outside the header (JSONL keys the first object lacks): how many, the first lines.
        self.unlisted = 0
        self.unlisted_lines: list[int] = []
        self._index: dict[str, int] = {}
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

    @abstractmethod
    def open(self) -> None:
        """Open the input (again, from the start) and validate its columns; raise InputError naming the problem."""

    @abstractmethod
    def close(self) -> None:
        """Release the input (safe to call twice)."""

    @abstractmethod
    def records(self) -> Iterator[tuple[list[str], Row]]:
        """Each remaining record as (its cells as text, its Row): `export` needs both."""

    @property
    @abstractmethod
    def lines_read(self) -> int:
        """Progress through the input in the unit `count_lines` counts."""

    def objects(self) -> Iterator[tuple[dict[str, Any], Row]]:
        """Each remaining record as (column → typed value, its Row); text formats give text values."""
        width = len(self.header)
        for fields, row in self.records():
            yield dict(zip(self.header, fields[:width], strict=False)), row

    def count_lines(self, stop: threading.Event | None = None) -> int:
        """The input's size in the unit of `lines_read`, for the progress estimate (see run/rowcount.py)."""
        return self.file.count_lines(stop)

    def batches(self, size: int = 512) -> Iterator[list[Row]]:
        """Yield lists of up to `size` rows until the input ends."""
        while batch := self.read_batch(size):
            yield batch

    def read_batch(self, size: int = 512) -> list[Row]:
        """Read up to `size` rows; an empty list means the input has ended."""
        return [row for _, row in itertools.islice(self.records(), size)]

    def _check_columns(self, hint: str = "") -> None:
        cfg = self.config
        missing = [c for c in cfg.template_columns if c not in self.header]
        if missing:
            what = "text column" if cfg.template is None else "template column"
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

    @property
    def used_columns(self) -> list[str]:
        """The columns a Row is made from (the id, the text or template columns, carry), in header order."""
        used = {*self.config.template_columns, *self.carry, *([self.id_column] if self.id_column else [])}
        return [name for name in self.header if name in used]

    def _make_row(self, fields: Sequence[str]) -> Row:
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


def _has_bad_bytes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def delimiter_hint(header: list[str]) -> str:
    """A hint for a header that is really one column: the delimiter was not the one guessed."""
    if len(header) == 1 and any(d in header[0] for d in _DELIMITERS[1:]):
        return " The header looks like one column: pass --delimiter (e.g. --delimiter ';')."
    if header and header[0].lstrip().startswith("{"):
        return " It looks like JSONL: name it .jsonl, or pass --input-format jsonl."
    return ""
