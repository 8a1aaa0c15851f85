"""The CSV reader: streams rows with stable ids, and turns messy input into clear errors or counted bad rows."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError
from pipeline.input.sources import CsvSource, content_id
from pipeline.results import Row
from pipeline.task.config import TaskConfig, parse_config

CONFIG = parse_config(
    {"instructions": "x", "labels": {"a": "a", "b": "b"}, "input": {"carry": ["lang"], "max_chars": 50}}
)


def read_all(path: Path, config: TaskConfig = CONFIG, **kwargs: Any) -> list[Row]:
    """Every row of a CSV, read in small batches."""
    with CsvSource(path, config, **kwargs) as source:
        return [row for batch in source.batches(7) for row in batch]


def write(tmp_path: Path, data: bytes | str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_reads_ids_text_and_carry_columns(tmp_path: Path) -> None:
    """Rows carry the id column, the text and the configured carry columns."""
    rows = read_all(write(tmp_path, "id,lang,text\n1,ko,안녕하세요\n2,en,hello\n"))
    assert [(r.id, r.text, dict(r.carry)) for r in rows] == [
        ("1", "안녕하세요", {"lang": "ko"}),
        ("2", "hello", {"lang": "en"}),
    ]
    assert [r.line for r in rows] == [1, 2]


def test_bom_crlf_quotes_and_newlines(tmp_path: Path) -> None:
    """A UTF-8 BOM, CRLF line ends, doubled quotes and newlines inside quotes are all read correctly."""
    data = '\ufeffid,text\r\n1,"say ""hi""\r\nand bye"\r\n2,emoji 🙂\r\n'
    rows = read_all(write(tmp_path, data))
    assert [r.id for r in rows] == ["1", "2"]
    assert rows[0].text == 'say "hi"\r\nand bye'
    assert rows[1].text == "emoji 🙂"


def test_missing_id_column_uses_stable_content_hashes(tmp_path: Path) -> None:
    """Without the id column, ids are content hashes: the same text gets the same id in every run."""
    path = write(tmp_path, "text\nhello\nworld\nhello\n")
    with CsvSource(path, CONFIG) as source:
        rows = source.read_batch(10)
        assert source.id_source == "content-hash"
    assert rows[0].id == rows[2].id == content_id("hello")
    assert rows[1].id != rows[0].id
    assert [r.id for r in read_all(path)] == [r.id for r in rows]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty (0 bytes)"),
        (b"id,body\n1,x\n", "text column 'text' not found. Columns are ['id', 'body']"),
        (b"id;text\n1;x\n", "text column 'text' not found"),
        ("id,text\n1,배송이 빨라요\n".encode("cp949"), "not UTF-8"),
        (b"\n\nid,text\n", "the first line is empty"),
    ],
)
def test_unreadable_input_is_a_clear_error(tmp_path: Path, data: bytes, message: str) -> None:
    """Inputs that cannot be labeled at all fail before any API call, with what to do next."""
    path = write(tmp_path, data)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        CsvSource(path, CONFIG, delimiter="," if b";" in data else None).open()


def test_cp949_file_suggests_the_encoding_and_reads_with_it(tmp_path: Path) -> None:
    """A legacy Korean (cp949) file is detected; with --encoding cp949 it reads correctly."""
    path = write(tmp_path, "id,text\n1,배송이 빨라요\n".encode("cp949"))
    with pytest.raises(InputError, match="--encoding cp949"):
        CsvSource(path, CONFIG).open()
    assert [r.text for r in read_all(path, encoding="cp949")] == ["배송이 빨라요"]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    """A missing path or a directory is an InputError naming it."""
    with pytest.raises(InputError, match="not found"):
        CsvSource(tmp_path / "none.csv", CONFIG).open()
    with pytest.raises(InputError, match="is a directory"):
        CsvSource(tmp_path, CONFIG).open()


def test_header_only_file_has_no_rows(tmp_path: Path) -> None:
    """A file with only a header is valid and yields no rows."""
    assert read_all(write(tmp_path, "id,text\n")) == []


def test_bad_rows_are_marked_not_raised(tmp_path: Path) -> None:
    """Ragged, empty, id-less and badly encoded rows come back with a problem, and the rest still read."""
    data = (
        b"id,lang,text\n"
        b"1,en,fine\n"
        b"2,en,too,many,fields\n"
        b"3,en,   \n"
        b"4,en\n"
        b",en,no id\n"
        b"6,en,bad \xff byte\n"
        b"7,en,also fine\n"
    )
    rows = read_all(write(tmp_path, data))
    problems = {r.id: r.problem for r in rows}
    assert problems == {
        "1": None,
        "2": "ragged_row",
        "3": "empty_text",
        "4": "empty_text",
        "line:5": "missing_id",
        "6": "bad_encoding",
        "7": None,
    }
    assert "header has 3" in next(r.detail for r in rows if r.id == "2")


def test_nul_bytes_are_dropped_and_counted(tmp_path: Path) -> None:
    """NUL bytes never reach the API: they are removed and counted."""
    path = write(tmp_path, b"id,text\n1,a\x00b\n")
    with CsvSource(path, CONFIG) as source:
        rows = source.read_batch(5)
        assert source.nul_bytes == 1
    assert rows[0].text == "ab"


def test_long_fields_are_cut_to_max_chars(tmp_path: Path) -> None:
    """A multi-megabyte field is read (no csv field limit error) and cut to max_chars, marked truncated."""
    path = write(tmp_path, "id,text\n1," + "x" * 3_000_000 + "\n2,short\n")
    rows = read_all(path)
    assert len(rows[0].text) == 50
    assert rows[0].truncated
    assert not rows[1].truncated


@pytest.mark.parametrize(("name", "delimiter"), [("in.tsv", "\t"), ("in.csv", ";"), ("in.csv", "|")])
def test_other_delimiters_are_guessed(tmp_path: Path, name: str, delimiter: str) -> None:
    """Tab, semicolon and pipe files are read without being told the delimiter."""
    path = write(tmp_path, f"id{delimiter}text\n1{delimiter}a, b\n", name)
    assert [(r.id, r.text) for r in read_all(path)] == [("1", "a, b")]


def test_wide_rows(tmp_path: Path) -> None:
    """A row with thousands of columns is read like any other."""
    header = ["id", "text", *(f"c{i}" for i in range(5000))]
    values = ["1", "hi", *("v" for _ in range(5000))]
    path = write(tmp_path, ",".join(header) + "\n" + ",".join(values) + "\n")
    assert [r.text for r in read_all(path)] == ["hi"]


def test_template_joins_columns(tmp_path: Path) -> None:
    """A template builds the text from several columns."""
    config = parse_config(
        {"instructions": "x", "labels": {"a": "a", "b": "b"}, "input": {"template": "{title}: {body}"}}
    )
    rows = read_all(write(tmp_path, "id,title,body\n1,Hi,there\n"), config)
    assert rows[0].text == "Hi: there"


text_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: s.strip() != "")


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(text_values, min_size=0, max_size=30),
    bom=st.booleans(),
    crlf=st.booleans(),
    quote_all=st.booleans(),
)
def test_whatever_csv_writes_we_read_back(
    tmp_path: Path, texts: list[str], bom: bool, crlf: bool, quote_all: bool
) -> None:
    """Any texts written by Python's csv module (quotes, commas, newlines, any Unicode) read back unchanged."""
    # With "\n" line ends and minimal quoting, csv.writer leaves a bare "\r" unquoted: no reader can recover it.
    assume(crlf or quote_all or not any("\r" in t for t in texts))
    buffer = io.StringIO()
    quoting = csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL
    writer = csv.writer(buffer, lineterminator="\r\n" if crlf else "\n", quoting=quoting)
    writer.writerow(["id", "text"])
    for i, text in enumerate(texts):
        writer.writerow([f"id{i}", text])
    path = write(tmp_path, ("\ufeff" if bom else "") + buffer.getvalue(), "prop.csv")
    config = parse_config({"instructions": "x", "labels": {"a": "a", "b": "b"}, "input": {"max_chars": 100}})
    rows = read_all(path, config)
    assert [(r.id, r.text) for r in rows] == [(f"id{i}", t) for i, t in enumerate(texts)]
    assert all(r.problem is None for r in rows)


def test_a_header_naming_a_used_column_twice_is_refused(tmp_path: Path) -> None:
    """`id,text,text` would silently read the last text column: refused, naming the column and its positions."""
    path = tmp_path / "in.csv"
    path.write_text("id,text,text\n1,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"names column 'text' 2 times \(columns 2, 3\)"):
        CsvSource(path, CONFIG).open()
    path.write_text("id,text,note,note\n1,a,b,c\n", encoding="utf-8")
    with CsvSource(path, CONFIG) as source:  # a repeated column the task does not use is fine
        assert [row.text for row in source.read_batch()] == ["a"]
