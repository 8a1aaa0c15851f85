"""JSONL (one object per line, plain, gzip or zstd) → `Row`s, line by line.

The columns are the keys of the first object; a later object without a key has an empty cell there, and keys
that only later objects have are not columns (JSONL exports keep them). A line that is not a JSON object is a
dead letter with its line number; a first line that is not one means the file is not JSONL at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson

from pipeline.errors import InputError
from pipeline.input.location import InputFile, check_format
from pipeline.input.render import render
from pipeline.input.rows import Source
from pipeline.results import Row
from pipeline.task.config import TaskConfig

_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


class JsonlSource(Source):
    """Reads a JSONL file as `Row`s, rendering non-string values as `render` says."""

    format = "jsonl"

    def __init__(self, file: InputFile, config: TaskConfig, *, require_id_column: bool = False) -> None:
        super().__init__(file, config, require_id_column=require_id_column)
        self._stream: Any = None
        self._lines: Iterator[tuple[int, bytes]] | None = None
        self._first: tuple[int, dict[str, Any]] | None = None
        self._physical = 0
        self._used: list[tuple[int, str]] = []  # (place, name) of the columns a Row is made of

    @property
    def lines_read(self) -> int:
        """Physical lines consumed so far."""
        return self._physical

    def open(self) -> None:
        """Open the file (again, from the start), read the first object's keys and check the columns."""
        self.close()
        self._line = self._physical = 0
        head = self.file.head(4096)
        if not head.strip():
            raise InputError(f"{self.path} is empty; expected one JSON object per line with a {self._text!r} key.")
        check_format(self.file, head)
        self._stream = self.file.open_stream()
        self._lines = self._numbered()
        try:
            self._first = self._first_object()
            self.header = list(self._first[1])
            self._check_columns(f" (a JSONL file's columns are the keys of its first object, line {self._first[0]})")
            self._used = [(self._index[name], name) for name in self.used_columns]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the underlying stream (safe to call twice)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._lines = None

    def records(self) -> Iterator[tuple[list[str], Row]]:
        """Each remaining line as (its cells as text, in header order, and its Row)."""
        header = self.header
        for obj, row in self._objects():
            if len(obj) > len(header) or any(key not in self._index for key in obj):
                self.unlisted += 1
                if len(self.unlisted_lines) < 5:
                    self.unlisted_lines.append(row.line)
            yield [render(obj.get(name)) for name in header], row

    def objects(self) -> Iterator[tuple[dict[str, Any], Row]]:
        """Each remaining line as (the object as read, its Row); a line that is no object gives `{}`."""
        return self._objects()

    def read_batch(self, size: int = 512) -> list[Row]:
        """Read up to `size` rows; an empty list means the file has ended."""
        return [row for _, row in itertools.islice(self._objects(), size)]

    @property
    def _text(self) -> str:
        return self.config.text_column if self.config.template is None else self.config.template_columns[0]

    def _objects(self) -> Iterator[tuple[dict[str, Any], Row]]:
        if self._lines is None:
            raise RuntimeError("JsonlSource.open() must be called first")
        if self._first is not None:
            (self._line, obj), self._first = self._first, None
            yield obj, self._row(obj)
        for number, line in self._lines:
            self._line = number
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield {}, self._bad_row(f"line:{number}", "unparsable_line", f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                detail = f"line {number} is a JSON {_kind(obj)}, not an object; each line must be one {{...}} object"
                yield {}, self._bad_row(f"line:{number}", "not_an_object", detail)
                continue
            yield obj, self._row(obj)

    def _row(self, obj: dict[str, Any]) -> Row:
        # Only the columns a Row is made of are rendered; the others stay empty (records() renders all).
        fields = [""] * len(self.header)
        for place, name in self._used:
            value = obj.get(name)
            fields[place] = value if type(value) is str else render(value)
        return self._make_row(fields)

    def _first_object(self) -> tuple[int, dict[str, Any]]:
        assert self._lines is not None  # noqa: S101 - set by open()
        for number, line in self._lines:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and obj:
                return number, obj
            what = "not valid JSON" if obj is None else f"a JSON {_kind(obj)}, not an object with keys"
            raise InputError(
                f"{self.path} is not JSONL: line {number} is {what}. A JSONL input holds one {{...}} object per "
                "line; if this file is CSV or Parquet, name it so or pass --input-format csv|tsv|parquet."
            )
        raise InputError(f"{self.path} holds only blank lines; expected one JSON object per line.")

    def _numbered(self) -> Iterator[tuple[int, bytes]]:
        """Non-blank lines with their 1-based line numbers, read in 1 MiB chunks."""
        rest = b""
        stream = self._stream
        while chunk := stream.read(_CHUNK):
            lines = (rest + bytes(chunk)).split(b"\n")
            rest = lines.pop()
            yield from self._counted(lines)
        if rest:
            yield from self._counted([rest])

    def _counted(self, lines: list[bytes]) -> Iterator[tuple[int, bytes]]:
        for line in lines:
            self._physical += 1
            text = line[len(_BOM) :] if self._physical == 1 and line.startswith(_BOM) else line
            if text.strip():
                yield self._physical, text


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return "literal"
    return "number" if isinstance(value, int | float) else type(value).__name__
