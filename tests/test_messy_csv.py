"""Messy CSVs end to end: each is labeled, dead-lettered with a reason and counted, or refused with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.analysis.export import export_labels
from pipeline.errors import InputError
from pipeline.sinks import open_sink

from .helpers import cli, dead_letters, ids_once, label, sink_ids

WIDE_HEADER = ",".join(["id", "text", *(f"c{i}" for i in range(3000))])
WIDE_ROW = ",".join(["w1", "wide row text", *("x" for _ in range(3000))])

CASES: dict[str, tuple[bytes, dict[str, str], dict[str, str]]] = {
    # name: (file bytes, {id: expected dead-letter kind or "ok"}, extra expectations)
    "utf8 bom": ("\ufeffid,text\n1,hello\n2,안녕\n".encode(), {"1": "ok", "2": "ok"}, {}),
    "crlf": (b"id,text\r\n1,hello\r\n2,bye\r\n", {"1": "ok", "2": "ok"}, {}),
    "korean and emoji": ("id,text\n1,배송 빨라요 👍🏽\n2,😡😡 최악\n".encode(), {"1": "ok", "2": "ok"}, {}),
    "quoted newlines and quotes": (b'id,text\n1,"line one\nline ""two"""\n2,"a, b"\n', {"1": "ok", "2": "ok"}, {}),
    "ragged rows": (
        b"id,text,lang\n1,short row\n2,too,many,fields,here\n3,fine,ko\n",
        {"1": "ok", "2": "ragged_row", "3": "ok"},
        {},
    ),
    "empty and blank text": (b'id,text\n1,\n2,"   "\n3,ok\n', {"1": "empty_text", "2": "empty_text", "3": "ok"}, {}),
    "duplicate ids": (b"id,text\n1,first\n1,first\n2,other\n", {"1": "ok", "2": "ok"}, {"duplicates": "1"}),
    "id repeated with other text": (
        b"id,text\n42,first\n 42 ,second\n2,other\n",
        {"42": "ok", "2": "ok"},
        {"conflicts": "1"},
    ),
    "nul bytes": (b"id,text\n1,a\x00b\n2,c\n", {"1": "ok", "2": "ok"}, {}),
    "stray invalid utf-8": (
        b"id,text\n1,fine\n2,bad \xff\xfe byte\n3,also fine\n",
        {"1": "ok", "2": "bad_encoding", "3": "ok"},
        {},
    ),
    "tab separated": (b"id\ttext\n1\ta, b\n2\tc\n", {"1": "ok", "2": "ok"}, {}),
    "semicolons": (b"id;text\n1;a, b\n2;c\n", {"1": "ok", "2": "ok"}, {}),
    "very wide rows": (f"{WIDE_HEADER}\n{WIDE_ROW}\n".encode(), {"w1": "ok"}, {}),
    "header only": (b"id,text\n", {}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_messy_input(sim: Any, tmp_path: Path, case: str) -> None:
    """Each row is labeled or dead-lettered with the expected reason; nothing crashes; the rest of the file goes on."""
    data, expected, extra = CASES[case]
    source = tmp_path / ("in.tsv" if "tab" in case else "in.csv")
    source.write_bytes(data)
    out = tmp_path / "out.jsonl"
    summary = label(sim, source, out)
    labeled = ids_once(out)
    failed = {d["id"]: d["kind"] for d in dead_letters(out)}
    assert labeled == {i for i, kind in expected.items() if kind == "ok"}
    assert failed == {i: kind for i, kind in expected.items() if kind != "ok"}
    assert summary.failed == len(failed)
    assert summary.exit_code == (1 if failed else 0)
    if "duplicates" in extra:
        assert summary.duplicates == int(extra["duplicates"])


def test_multi_megabyte_field_is_cut_not_rejected(sim: Any, tmp_path: Path) -> None:
    """A 3 MB text is cut to max_chars and labeled (marked truncated), instead of a 400 for the request."""
    source = tmp_path / "in.csv"
    source.write_text("id,text\n1," + "long text " * 300_000 + "\n2,short\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    summary = label(sim, source, out)
    records = {r["id"]: r for r in open_sink(out).iter_records()}
    assert records["1"]["truncated"] is True and records["2"]["truncated"] is False
    assert summary.truncated == 1
    assert "were cut" in summary.render()


def test_no_id_column_uses_content_hashes_and_resumes(sim: Any, tmp_path: Path) -> None:
    """Without an id column, ids are content hashes: the rerun recognises every row and makes no request."""
    source = tmp_path / "in.csv"
    source.write_text("text\nhello\nworld\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    label(sim, source, out)
    assert len(sink_ids(out)) == 2
    sim.reset()
    label(sim, source, out)
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty (0 bytes)"),
        (b"id,body\n1,x\n", "text column 'text' not found"),
        ("id,text\n1,배송이 빨라요 정말 좋아요\n".encode("cp949"), "--encoding cp949"),
    ],
    ids=["zero bytes", "no text column", "cp949 file"],
)
def test_unusable_files_are_refused_before_any_request(sim: Any, tmp_path: Path, data: bytes, message: str) -> None:
    """Files that cannot be labeled at all exit 2 with one line naming the problem, before any API call."""
    source = tmp_path / "in.csv"
    source.write_bytes(data)
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        label(sim, source, out)
    result = cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_survives_rows_with_invalid_bytes(sim: Any, tmp_path: Path, suffix: str) -> None:
    """Export keeps a row whose bytes are not UTF-8 (as read for CSV, replaced for Parquet), its label empty."""
    source = tmp_path / "in.csv"
    source.write_bytes(b"id,text\n1,fine\n2,bad \xff byte\n3,also fine\n")
    out = tmp_path / "out.jsonl"
    label(sim, source, out)
    result = export_labels(out, source, tmp_path / f"labeled{suffix}")
    assert (result.rows, result.labeled, result.unlabeled) == (3, 2, 1)
    if suffix == ".csv":
        assert b"bad \xff byte" in (tmp_path / "labeled.csv").read_bytes()
    assert not list(tmp_path.glob(".labeled*.tmp"))
