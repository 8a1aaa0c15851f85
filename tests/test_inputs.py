"""Inputs in every format: CSV/TSV (plain, gzip, zstd), JSONL, Parquet (file or directory), read as a stream.

Each format is labeled through the simulator, resumed with zero requests and exported; typed cells render as
documented (docs/inputs.md); a file of another format than its name says is a clear error.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.analysis.evaluate import evaluate
from pipeline.analysis.export import export_labels
from pipeline.errors import InputError
from pipeline.input.location import ReadOptions
from pipeline.input.render import render
from pipeline.input.shards import Shard
from pipeline.input.sources import input_source
from pipeline.results import Row
from pipeline.sinks import open_shards
from pipeline.task.config import TaskConfig, parse_config

from .helpers import SENTIMENT, cli, dead_letters, label, sink_ids

CONFIG = parse_config({"instructions": "x", "labels": {"a": "a", "b": "b"}, "input": {"carry": ["n", "tags"]}})
ROWS: list[dict[str, Any]] = [
    {"id": i, "lang": "ko" if i % 2 else "en", "text": f"review {i}: fine" if i % 3 else f"리뷰 {i}", "score": i / 4}
    for i in range(1, 25)
]


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return bytes(sink.getvalue().to_pybytes())


def _csv_bytes(rows: list[dict[str, Any]], delimiter: str = ",") -> bytes:
    lines: list[str] = []
    # The default "\r\n" line end makes the writer quote a lone "\r" too, as a CSV reader needs.
    writer = csv.writer(_Lines(lines), delimiter=delimiter)
    writer.writerow(list(rows[0]))
    writer.writerows([render(v) for v in row.values()] for row in rows)
    return "".join(lines).encode()


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.append(text)


def _jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows)


def _write(tmp_path: Path, kind: str, rows: list[dict[str, Any]] = ROWS) -> Path:
    """The rows in one of the supported shapes; the file name says the format."""
    if kind == "parquet":
        path = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif kind == "parquet-dir":
        path = tmp_path / "in_dir"
        path.mkdir()
        for part, start in enumerate(range(0, len(rows), 10)):
            pq.write_table(pa.Table.from_pylist(rows[start : start + 10]), path / f"part-{part:02d}.parquet")
    else:
        writers: dict[str, tuple[str, Callable[[], bytes]]] = {
            "csv": ("in.csv", lambda: _csv_bytes(rows)),
            "tsv.gz": ("in.tsv.gz", lambda: gzip.compress(_csv_bytes(rows, "\t"))),
            "csv.zst": ("in.csv.zst", lambda: _zstd(_csv_bytes(rows))),
            "jsonl": ("in.jsonl", lambda: _jsonl_bytes(rows)),
            "ndjson.gz": ("in.ndjson.gz", lambda: gzip.compress(_jsonl_bytes(rows))),
        }
        name, make = writers[kind]
        path = tmp_path / name
        path.write_bytes(make())
    return path


def _folder(parent: Path, name: str) -> Path:
    folder = parent / name
    folder.mkdir()
    return folder


def _read(path: Path, config: TaskConfig = CONFIG, fmt: str | None = None) -> list[Row]:
    with input_source(path, config, ReadOptions(format=fmt)) as source:
        return [row for batch in source.batches(5) for row in batch]


KINDS = ["csv", "tsv.gz", "csv.zst", "jsonl", "ndjson.gz", "parquet", "parquet-dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_labels_resumes_with_zero_requests_and_exports(sim: Any, tmp_path: Path, kind: str) -> None:
    """Every format labels all rows, a second run sends nothing, and export joins the labels in input order."""
    source = _write(tmp_path, kind)
    out = tmp_path / "out.parquet"
    first = label(sim, source, out)
    assert first.exit_code == 0 and first.labeled == len(ROWS)
    assert sorted(sink_ids(out), key=int) == [str(r["id"]) for r in ROWS]
    before = sim.stats()["requests"]
    again = label(sim, source, out)
    assert (again.labeled, again.skipped_done, sim.stats()["requests"] - before) == (0, len(ROWS), 0)
    suffix = ".jsonl" if "json" in kind else ".parquet" if "parquet" in kind else ".csv"
    exported = tmp_path / f"labeled{suffix}"
    result = export_labels(out, source, exported)
    assert (result.rows, result.labeled) == (len(ROWS), len(ROWS))
    if suffix == ".jsonl":
        back = [orjson.loads(line) for line in exported.read_bytes().splitlines()]
    elif suffix == ".parquet":
        back = pq.read_table(exported).to_pylist()
    else:
        back = list(csv.DictReader(exported.read_text().splitlines()))
    assert [str(r["id"]) for r in back] == [str(r["id"]) for r in ROWS]
    assert all(r["label"] in SENTIMENT.labels for r in back)
    if suffix != ".csv":  # typed inputs keep their types in an export of their own format
        assert (back[0]["id"], back[0]["score"]) == (1, 0.25)


def test_parquet_shards_limit_and_dry_run(sim: Any, tmp_path: Path) -> None:
    """On a Parquet input --limit labels that many new rows, shards split the rows, and --dry-run counts them."""
    source = _write(tmp_path, "parquet")
    out = tmp_path / "out.parquet"
    assert label(sim, source, out, max_rows=5, shard=Shard(0, 2)).labeled == 5
    dry = cli("label", "--input", str(source), "--output", str(out), "--shard", "1/2", "--dry-run", "--base-url",
              sim.base_url)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    second = label(sim, source, out, shard=Shard(1, 2))
    assert f"{second.labeled:,} rows to label" in dry.stdout
    first = label(sim, source, out, shard=Shard(0, 2))
    assert first.labeled + 5 + second.labeled == len(ROWS)
    ids = [r["id"] for sink in open_shards(out) for r in sink.iter_records(columns=["id"])]
    assert sorted(ids, key=int) == [str(r["id"]) for r in ROWS]


def test_rendering_of_typed_cells() -> None:
    """Numbers, bools, nulls, dates, lists and structs render as docs/inputs.md says."""
    cases: list[tuple[Any, str]] = [
        (42, "42"),
        (-7, "-7"),
        (42.0, "42"),
        (0.1, "0.1"),
        (1e20, "1e+20"),
        (2.5e-7, "2.5e-07"),
        (True, "true"),
        (False, "false"),
        (None, ""),
        ("  as is ", "  as is "),
        (dt.date(2024, 1, 2), "2024-01-02"),
        (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05"),
    ]
    assert [(value, render(value)) for value, _ in cases] == cases
    assert render([1, "a", None]) == '[1,"a",null]'
    assert render({"k": [True], "v": 1.5}) == '{"k":[true],"v":1.5}'


def test_parquet_float32_and_integer_with_nulls_render_as_written(tmp_path: Path) -> None:
    """A float32 0.1 renders as 0.1 (not 0.10000000149…); an integer column with a null renders 42, then empty."""
    table = pa.table({
        "id": pa.array([42.0, None], pa.float64()),  # pandas turns an int column with a null into float64
        "text": ["a", "b"],
        "n": pa.array([0.1, 2.0], pa.float32()),
        "tags": pa.array([["x", "y"], None]),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    rows = _read(tmp_path / "t.parquet")
    assert (rows[0].id, dict(rows[0].carry)) == ("42", {"n": "0.1", "tags": '["x","y"]'})
    assert (rows[1].id, rows[1].problem) == ("line:2", "missing_id")


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_CELL = {
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
    "text": _TEXT,
    "list": st.lists(st.integers(-5, 5), max_size=3),
}


@st.composite
def _tables(draw: Any) -> list[dict[str, Any]]:
    """Rows with a typed id, a text, and carry columns of one random type each (nulls anywhere but the text)."""
    kinds = [draw(st.sampled_from(list(_CELL))) for _ in range(3)]
    count = draw(st.integers(1, 8))
    rows = []
    for _ in range(count):
        row = {"id": draw(st.one_of(st.none(), _CELL[kinds[0]]))}
        row["text"] = draw(_TEXT)
        row["n"] = draw(st.one_of(st.none(), _CELL[kinds[1]]))
        row["tags"] = draw(st.one_of(st.none(), _CELL[kinds[2]]))
        rows.append(row)
    return rows


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_tables())
def test_csv_jsonl_and_parquet_of_the_same_data_yield_the_same_rows(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    """The same data as CSV (cells written as rendered), JSONL and Parquet gives the same ids, texts and carry."""
    seen = []
    for kind in ("csv", "jsonl", "parquet"):
        read = _read(_write(_folder(tmp_path, f"{kind}-{len(list(tmp_path.iterdir()))}"), kind, rows))
        seen.append([(r.id, r.text, r.line, dict(r.carry), r.problem) for r in read])
    assert seen[0] == seen[1] == seen[2]


def _labeled_pair(sim: Any, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    source = _write(tmp_path, kind)
    out = tmp_path / "out.jsonl"
    assert label(sim, source, out).exit_code == 0
    return source, out


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_eval_reads_gold_from_jsonl_and_parquet(sim: Any, tmp_path: Path, kind: str) -> None:
    """eval takes its gold labels from a JSONL or Parquet file as it does from a CSV."""
    _, out = _labeled_pair(sim, tmp_path, "csv")
    gold_rows = [{"id": r["id"], "gold": "positive"} for r in ROWS[:10]] + [{"id": 999, "gold": None}]
    gold = _write(_folder(tmp_path, "gold"), kind, gold_rows)
    result = evaluate(out, gold, "gold")
    assert (result.gold_rows, result.labeled) == (10, 10)


def test_export_from_jsonl_to_csv_and_parquet_to_jsonl(sim: Any, tmp_path: Path) -> None:
    """Export crosses formats: a JSONL input to CSV (cells rendered), a Parquet input to JSONL (values typed)."""
    source, out = _labeled_pair(sim, tmp_path, "jsonl")
    export_labels(out, source, tmp_path / "x.csv")
    table = list(csv.DictReader((tmp_path / "x.csv").read_text().splitlines()))
    assert [(r["id"], r["score"]) for r in table[:2]] == [("1", "0.25"), ("2", "0.5")]
    parquet = _write(_folder(tmp_path, "p"), "parquet")
    result = cli("export", str(out), "--input", str(parquet), "--to", str(tmp_path / "y.jsonl"))
    assert result.returncode == 0, result.stderr
    first = json.loads((tmp_path / "y.jsonl").read_text().splitlines()[0])
    assert first["id"] == 1 and first["score"] == 0.25 and first["label"] in SENTIMENT.labels


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("data.csv", "parquet", "holds Parquet data, not CSV. Rename it to .parquet, or pass --input-format parquet"),
        ("data.parquet", "csv", "is not Parquet (it does not start with PAR1; it looks like text (CSV?)). Pass "
         "--input-format csv|tsv"),
        ("data.jsonl", "csv", "is not JSONL: line 1 is not valid JSON"),
        ("data.jsonl", "array", "is not JSONL: line 1 is a JSON array"),
        ("data.parquet", "jsonl", "it looks like JSONL). Pass --input-format jsonl"),
    ],
)  # fmt: skip
def test_a_file_of_another_format_than_its_name_is_a_clear_error(
    sim: Any, tmp_path: Path, name: str, content: str, says: str
) -> None:
    """Content that is not what the name says stops the run with exit 2, naming the file and --input-format."""
    path = tmp_path / name
    if content == "array":
        path.write_text("[1, 2]\n")
    else:
        path.write_bytes(_write(_folder(tmp_path, content), content).read_bytes())
    result = cli("label", "--input", str(path), "--output", str(tmp_path / "o.jsonl"), "--base-url", sim.base_url)
    assert result.returncode == 2
    assert str(path) in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr


def test_input_format_reads_a_misnamed_file(tmp_path: Path) -> None:
    """--input-format overrides the extension: JSONL in a .txt file is read as JSONL."""
    path = tmp_path / "export.txt"
    path.write_bytes(_jsonl_bytes(ROWS))
    assert [r.id for r in _read(path, fmt="jsonl")] == [str(r["id"]) for r in ROWS]


def test_jsonl_line_that_is_not_an_object_is_dead_lettered_with_its_line(sim: Any, tmp_path: Path) -> None:
    """A JSONL line that is not an object (or not JSON) is a dead letter naming its line; the other rows are labeled."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(_jsonl_bytes(ROWS[:2]) + b'["a list"]\n\n{"id": 3, "text": broken\n' + _jsonl_bytes(ROWS[3:4]))
    out = tmp_path / "out.jsonl"
    summary = label(sim, path, out)
    assert summary.exit_code == 1 and sorted(sink_ids(out)) == ["1", "2", "4"]
    failed = {d["id"]: (d["kind"], d["message"]) for d in dead_letters(out)}
    assert failed["line:3"][0] == "not_an_object" and "line 3 is a JSON array" in failed["line:3"][1]
    assert failed["line:5"][0] == "unparsable_line" and "line 5 is not valid JSON" in failed["line:5"][1]


def test_parquet_without_the_text_column_names_its_columns(tmp_path: Path) -> None:
    """A Parquet input without the text column is an error that lists the columns it has."""
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"text column 'text' not found\. Columns are \['id', 'body'\]"):
        _read(tmp_path / "in.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no Parquet files"):
        _read(tmp_path / "empty")


def test_a_corrupt_parquet_file_or_a_stray_file_in_a_dataset_stops_before_any_request(tmp_path: Path) -> None:
    """A truncated Parquet file, or a non-Parquet file inside a dataset directory, is an error naming that file."""
    good = _write(_folder(tmp_path, "good"), "parquet")
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match=r"cannot read .*cut\.parquet as Parquet: .*pass --input-format"):
        _read(truncated)
    folder = _write(_folder(tmp_path, "ds"), "parquet-dir")
    (folder / "part-99.parquet").write_text("id,text\n1,x\n")
    with pytest.raises(InputError, match=r"part-99\.parquet.*if a directory holds other files, move them out"):
        _read(folder)


def test_parquet_dataset_reads_hive_partitions_and_files_missing_a_column(tmp_path: Path) -> None:
    """A `key=value` folder becomes a column; a file without a carry column gives empty cells there."""
    config = parse_config({"instructions": "x", "labels": {"a": "a", "b": "b"}, "input": {"carry": ["lang", "n"]}})
    root = tmp_path / "ds"
    for lang, rows in (("en", [{"id": 1, "text": "a", "n": 5}]), ("ko", [{"id": 2, "text": "b"}])):
        (root / f"lang={lang}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / f"lang={lang}" / "part.parquet")
    rows = _read(root, config)
    assert [(r.id, r.text, dict(r.carry)) for r in rows] == [
        ("1", "a", {"lang": "en", "n": "5"}),
        ("2", "b", {"lang": "ko", "n": ""}),
    ]


def test_compression_is_recognised_from_the_content_not_only_the_name(tmp_path: Path) -> None:
    """A gzip file named plain `.csv` and a zstd file named `.jsonl` are decompressed from their magic bytes."""
    (tmp_path / "in.csv").write_bytes(gzip.compress(_csv_bytes(ROWS)))
    (tmp_path / "in.jsonl").write_bytes(_zstd(_jsonl_bytes(ROWS)))
    expected = [str(r["id"]) for r in ROWS]
    assert [r.id for r in _read(tmp_path / "in.csv")] == [r.id for r in _read(tmp_path / "in.jsonl")] == expected


def test_a_uri_input_needs_an_output(tmp_path: Path) -> None:
    """With an s3:// input there is no folder beside it for the labels: --output is asked for, nothing is opened."""
    result = cli("label", "--input", "s3://bucket/reviews.parquet", "--base-url", "http://127.0.0.1:9/v1")
    assert result.returncode == 2 and "is a URI" in result.stderr and "pass --output" in result.stderr


def test_jsonl_keys_only_later_objects_have_are_named_by_a_csv_export_and_kept_by_a_jsonl_one(
    sim: Any, tmp_path: Path
) -> None:
    """Keys the first object lacks are not CSV columns: export says which lines had them; a JSONL export keeps them."""
    rows = [dict(row) for row in ROWS[:4]]
    rows[2]["extra"] = "kept"
    source = tmp_path / "in.jsonl"
    source.write_bytes(_jsonl_bytes(rows))
    out = tmp_path / "out.jsonl"
    assert label(sim, source, out).exit_code == 0
    to_csv = cli("export", str(out), "--input", str(source), "--to", str(tmp_path / "x.csv"))
    assert to_csv.returncode == 0 and "1 JSONL rows have keys the first line does not (lines 3…)" in to_csv.stderr
    to_jsonl = cli("export", str(out), "--input", str(source), "--to", str(tmp_path / "x.jsonl"))
    assert to_jsonl.returncode == 0 and not to_jsonl.stderr
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[2])["extra"] == "kept"
