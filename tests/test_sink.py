"""Sinks: append-only, readable at every moment, and resumable to exactly-once after crashes at any point."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import SinkError, SinkMismatchError, UsageError
from pipeline.input.ids import IdSet
from pipeline.results import Labeled, Row, problem_failure
from pipeline.sinks import Identity, JsonlSink, Sink, open_sink
from pipeline.sinks.compact import compact
from pipeline.sinks.parquet import ParquetSink

SINKS = ["out.jsonl", "out.parquet"]
ROOT = Path(__file__).resolve().parent.parent
IDENTITY = Identity(model="m", prompt="p1", labels=("a", "b"), multi_label=False, id_source="column:id")


def labeled(row_id: str, label: str = "a") -> Labeled:
    row = Row(id=row_id, text=f"text {row_id}", line=1, carry={"lang": "ko"})
    return Labeled(row, label, "m", 10, 2, 12.5, 1, "2026-11-27T01:02:03.456Z")


def open_for_run(path: Path) -> tuple[Sink, set[str]]:
    sink = open_sink(path)
    done = sink.load_done()
    sink.bind_schema(["lang"], multi_label=False)
    return sink, done  # type: ignore[return-value]  # IdSet supports `in`, all the test needs


def write(sink: Sink, *batches: list[Labeled]) -> None:
    """Append batches and close, in one event loop (as one run would)."""

    async def go() -> None:
        for batch in batches:
            await sink.append(batch)
        await sink.close()

    asyncio.run(go())


def ids_in(sink: Sink) -> list[str]:
    return [r["id"] for r in sink.iter_records(columns=["id"])]


@pytest.mark.parametrize("name", SINKS)
def test_append_then_resume_knows_the_done_ids(tmp_path: Path, name: str) -> None:
    """What one run appends, the next run's load_done reports as done."""
    sink, _ = open_for_run(tmp_path / name)
    write(sink, [labeled("1"), labeled("2", "b")])
    again, done = open_for_run(tmp_path / name)
    assert "1" in done and "2" in done and "3" not in done
    records = list(again.iter_records())
    assert [(r["id"], r["label"], r["lang"]) for r in records] == [("1", "a", "ko"), ("2", "b", "ko")]


def test_torn_jsonl_tail_is_cut_and_reported(tmp_path: Path) -> None:
    """A half-written last line (crash mid-write) is cut on open and reported; the complete lines stay."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"1","label":"a"}\n{"id":"2","label":"b"}\n{"id":"3","lab')
    sink = JsonlSink(path)
    done = sink.load_done()
    assert len(done) == 2 and "3" not in done
    assert path.read_bytes().endswith(b'"b"}\n')
    assert any("torn last line" in note for note in sink.notes)


def test_jsonl_garbage_in_the_middle_is_an_error(tmp_path: Path) -> None:
    """A line that is not a record (edited by hand?) stops the run with its line number."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"1"}\nhello\n{"id":"2"}\n')
    with pytest.raises(SinkError, match="line 2"):
        JsonlSink(path).load_done()


def test_wrong_kind_of_path(tmp_path: Path) -> None:
    """A .jsonl that is a directory, a .parquet that is a file, or an unknown suffix are usage errors."""
    (tmp_path / "d.jsonl").mkdir()
    (tmp_path / "f.parquet").write_text("x")
    with pytest.raises(UsageError):
        open_sink(tmp_path / "d.jsonl").load_done()
    with pytest.raises(UsageError):
        open_sink(tmp_path / "f.parquet").load_done()
    with pytest.raises(UsageError, match=r"\.jsonl or \.parquet"):
        open_sink(tmp_path / "out.csv")


@pytest.mark.parametrize("name", SINKS)
def test_identity_guard(tmp_path: Path, name: str) -> None:
    """Resuming with another model or prompt is refused naming the difference; --force records it."""
    sink, _ = open_for_run(tmp_path / name)
    sink.meta.write_manifest(sink.meta.check_identity(IDENTITY, has_rows=False, force=False, sink_name=name))
    write(sink, [labeled("1")])
    changed = Identity(model="gpt-4o", prompt="p2", labels=("a", "b"), multi_label=False, id_source="column:id")
    with pytest.raises(SinkMismatchError) as caught:
        sink.meta.check_identity(changed, has_rows=True, force=False, sink_name=name)
    assert "model m → gpt-4o" in caught.value.message
    assert "prompt p1 → p2" in caught.value.message
    assert "--force" in caught.value.message
    forced = sink.meta.check_identity(changed, has_rows=True, force=True, sink_name=name)
    assert forced.forced[0]["differences"][0] == "model m → gpt-4o"
    assert forced.model == "gpt-4o"


def test_rows_without_manifest_are_refused(tmp_path: Path) -> None:
    """A sink with rows but no manifest cannot be resumed without --force (its origin is unknown)."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"1"}\n')
    with pytest.raises(SinkMismatchError, match="no manifest"):
        JsonlSink(path).meta.check_identity(IDENTITY, has_rows=True, force=False, sink_name="out.jsonl")


def test_parquet_schema_is_typed_and_stable(tmp_path: Path) -> None:
    """Parts have typed columns in a fixed order; a run that would change them is refused."""
    sink, _ = open_for_run(tmp_path / "out.parquet")
    write(sink, [labeled("1")])
    schema = ds.dataset(tmp_path / "out.parquet").schema
    assert schema.names == [
        "id", "label", "confidence", "lang", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
        "latency_ms", "attempts", "truncated", "text_sha", "labeled_at", "copied_from",
    ]  # fmt: skip
    assert str(schema.field("confidence").type) == "float"
    assert str(schema.field("labeled_at").type) == "timestamp[ms, tz=UTC]"
    assert str(schema.field("prompt_tokens").type) == "int32"
    other = ParquetSink(tmp_path / "out.parquet")
    with pytest.raises(SinkMismatchError, match="columns"):
        other.bind_schema(["lang", "extra"], multi_label=False)


def test_parquet_multi_label_is_a_list_column(tmp_path: Path) -> None:
    """Multi-label sinks store a list<string> label column."""
    sink = ParquetSink(tmp_path / "out.parquet")
    sink.load_done()
    sink.bind_schema([], multi_label=True)
    write(sink, [labeled("1", ["a", "b"])])  # type: ignore[arg-type]
    assert ds.dataset(tmp_path / "out.parquet").to_table().column("label").to_pylist() == [["a", "b"]]


def test_compaction_keeps_every_row_once(tmp_path: Path) -> None:
    """compact merges many parts into one without losing or repeating a row, and leaves no side files."""
    sink, _ = open_for_run(tmp_path / "out.parquet")
    write(sink, *([labeled(str(i)) for i in range(start, start + 10)] for start in range(0, 50, 10)))
    assert len(sink.parts()) == 5
    assert compact(tmp_path / "out.parquet") == (5, 1)
    assert sorted(ids_in(ParquetSink(tmp_path / "out.parquet")), key=int) == [str(i) for i in range(50)]
    assert sorted(p.name for p in (tmp_path / "out.parquet.meta").iterdir()) == ["lock", "tmp"]


@pytest.mark.parametrize("stage", ["before-swap", "between-renames"])
def test_interrupted_compaction_recovers_old_or_new(tmp_path: Path, stage: str) -> None:
    """A compaction that died midway is finished or rolled back on the next open: never both sets, never neither."""
    sink, _ = open_for_run(tmp_path / "out.parquet")
    write(sink, *([labeled(str(i)) for i in range(start, start + 10)] for start in range(0, 30, 10)))
    meta = sink.meta.dir
    merged = meta / "rewrite.new"
    merged.mkdir()
    shutil.copy(sink.parts()[0], merged / sink.parts()[0].name)  # a partial new set
    if stage == "between-renames":
        shutil.rmtree(merged)
        compact(tmp_path / "out.parquet")  # produce a real compacted set to stage from
        (tmp_path / "out.parquet").rename(merged)
        (meta / "rewrite.ready").touch()
    reopened, done = open_for_run(tmp_path / "out.parquet")
    assert len(done) == 30
    assert sorted(ids_in(reopened), key=int) == [str(i) for i in range(30)]
    assert not merged.exists() and not (meta / "rewrite.ready").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(SINKS), n=st.integers(1, 60))
def test_any_crashes_then_resume_give_each_id_once(tmp_path: Path, data: st.DataObject, name: str, n: int) -> None:
    """Batches of writes, crashes at random points (torn tails, orphaned temp parts) and resumes: each id once."""
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / name
    wanted = [f"r{i}" for i in range(n)]

    async def one_run(sink: Sink, todo: list[str]) -> None:
        """Append batches until the input ends or a crash is drawn; a crash skips close()."""
        while todo:
            size = data.draw(st.integers(1, 8), label="batch")
            batch, todo = todo[:size], todo[size:]
            crash = data.draw(st.sampled_from(["none", "none", "torn", "before-rename", "after-write"]))
            before = path.stat().st_size if path.is_file() else 0
            if crash == "before-rename" and isinstance(sink, ParquetSink):
                sink.meta.tmp_dir.mkdir(parents=True, exist_ok=True)
                (sink.meta.tmp_dir / "part-000999-deadbeef.parquet.tmp").write_bytes(b"PAR1 half a part")
                break
            await sink.append([labeled(i) for i in batch])
            await sink.close()
            if crash == "torn" and isinstance(sink, JsonlSink):
                cut = data.draw(st.integers(before, path.stat().st_size), label="cut")
                with path.open("r+b") as handle:
                    handle.truncate(cut)
                break
            if crash == "after-write":
                break

    for _ in range(100):  # runs; each may crash
        sink, done = open_for_run(path)
        todo = [i for i in wanted if i not in done]
        if not todo:
            break
        asyncio.run(one_run(sink, todo))
        if path.is_dir():  # readable at this moment, as a downstream reader would see it
            ds.dataset(path, format="parquet").to_table()
    final, done = open_for_run(path)
    got = ids_in(final)
    assert sorted(got) == sorted(wanted)
    assert len(got) == len(set(got))
    if path.is_dir():
        assert not list(final.meta.tmp_dir.iterdir())


def test_two_runs_cannot_write_one_sink(tmp_path: Path) -> None:
    """A second run on a sink that another run holds is refused with the holder's pid."""
    first = JsonlSink(tmp_path / "out.jsonl")
    first.meta.lock()
    try:
        with pytest.raises(SinkError, match=rf"another labelstream run \(pid {os.getpid()}\)"):
            JsonlSink(tmp_path / "out.jsonl").meta.lock()
    finally:
        first.meta.unlock()
    again = JsonlSink(tmp_path / "out.jsonl").meta
    again.lock()  # free again once released
    again.unlock()


@pytest.mark.parametrize("name", SINKS)
def test_drop_ids_removes_exactly_those_records_at_once(tmp_path: Path, name: str) -> None:
    """drop_ids rewrites the sink without the given ids (what --relabel-changed does before relabeling)."""
    sink, _ = open_for_run(tmp_path / name)
    write(sink, [labeled(str(i)) for i in range(10)], [labeled(str(i)) for i in range(10, 20)])
    drop = IdSet(["3", "12", "404"])
    assert open_sink(tmp_path / name).drop_ids(drop) == 2
    left = ids_in(open_sink(tmp_path / name))
    assert sorted(left, key=int) == [str(i) for i in range(20) if i not in (3, 12)]
    if name.endswith(".parquet"):
        assert all(p.suffix == ".parquet" for p in (tmp_path / name).iterdir())
        assert not (tmp_path / f"{name}.meta" / "rewrite.new").exists()


_FILL_UNTIL_REFUSED = """
import resource, signal, sys
from pathlib import Path
from pipeline.sinks.files import Appender

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file is EFBIG, like ENOSPC on a full disk
path = Path(sys.argv[1])
appender = Appender(path)
appender.append(b'{"id":"1"}\\n')
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, resource.RLIM_INFINITY))
try:
    appender.append(b'{"id":"2","text":"' + b"x" * 100 + b'"}\\n')
except OSError:
    pass
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
appender.append(b'{"id":"3"}\\n')
"""


def test_a_failed_append_leaves_no_torn_record_behind(tmp_path: Path) -> None:
    """An append the disk refuses half-way is cut back, so the next append on the same handle follows a whole line."""
    path = tmp_path / "out.jsonl"
    subprocess.run([sys.executable, "-c", _FILL_UNTIL_REFUSED, str(path)], check=True, cwd=ROOT, timeout=60)
    assert path.read_bytes() == b'{"id":"1"}\n{"id":"3"}\n'


_SHARED_DEAD_LETTERS = """
import resource, signal, sys
from pathlib import Path
from pipeline.errors import StorageError
from pipeline.results import Failed, Row
from pipeline.sinks.meta import append_dead_letters

def failed(row_id, message=""):
    return Failed(Row(row_id, "t", 1), "http_500", message, 3, 500, "2026-12-04T00:00:00.000Z")

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file is EFBIG, like ENOSPC on a full disk
path = Path(sys.argv[1])
append_dead_letters(path, [failed("1")], "run1")
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, resource.RLIM_INFINITY))
try:
    append_dead_letters(path, [failed("2", "x" * 100)], "run1")
except StorageError as exc:
    print(exc.message)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
append_dead_letters(path, [failed("3")], "run1")
"""


def test_a_ray_actor_dead_letter_refused_half_way_is_cut_back_and_reported(tmp_path: Path) -> None:
    """The shared dead-letter writer (Ray actors) raises StorageError on a full disk and leaves no torn line."""
    path = tmp_path / "dead_letters.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _SHARED_DEAD_LETTERS, str(path)],
        check=False,
        cwd=ROOT,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"cannot write {path}" in done.stdout
    assert [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()] == ["1", "3"]


_ONE_WRITER = """
import sys
from pathlib import Path
from pipeline.results import Failed, Row
from pipeline.sinks.meta import append_dead_letters

who = sys.argv[2]
for batch in range(20):
    items = [Failed(Row(f"{who}-{batch}-{i}", "t", 1), "http_500", who * 3000, 3, 500, "now") for i in range(10)]
    append_dead_letters(Path(sys.argv[1]), items, who)
"""


def test_several_processes_append_dead_letters_to_one_file_without_mixing_lines(tmp_path: Path) -> None:
    """Four writers appending 200 large dead letters each to one file (Ray actors on a shared path) leave 800 lines."""
    path = tmp_path / "shared" / "dead_letters.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", _ONE_WRITER, str(path), who], cwd=ROOT) for who in ("a", "b", "c", "d")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    letters = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert len({x["id"] for x in letters}) == 800 and all(x["message"] == x["run"] * 3000 for x in letters)


def test_an_old_problem_dead_letter_reads_as_bad_row(tmp_path: Path) -> None:
    """Problem rows have one dead-letter kind; the Ray engine's old "problem" reads back as "bad_row"."""
    sink, _ = open_for_run(tmp_path / "out.jsonl")
    sink.meta.ensure()
    old = {"id": "7", "line": 7, "kind": "problem", "message": "", "attempts": 0, "status": None, "run": "r"}
    sink.meta.dead_letters_path.write_bytes(orjson.dumps(old) + b"\n")
    assert [x["kind"] for x in sink.meta.read_dead_letters()] == ["bad_row"]
    assert problem_failure(Row("8", "", 8)).kind == "bad_row"
    assert problem_failure(Row("9", "", 9, problem="empty_text")).kind == "empty_text"


class _GatedSink(JsonlSink):
    """A JSONL sink whose writes wait for a gate, so a test can cancel the writer while its thread writes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.started = threading.Event()
        self.gate = threading.Event()

    def write_batch(self, items: Sequence[Labeled]) -> None:
        self.started.set()
        self.gate.wait(timeout=30)
        super().write_batch(items)


def test_a_cancelled_append_ends_only_after_its_write(tmp_path: Path) -> None:
    """Cancelling a writer whose batch is on the I/O thread lets the cancellation through only once the batch is in
    the file, and the batch is still reported saved, so the run's count matches what the sink holds."""

    async def scenario() -> tuple[list[str], list[int]]:
        sink = _GatedSink(tmp_path / "out.jsonl")
        sink.load_done()
        sink.bind_schema(["lang"], multi_label=False)
        reported: list[int] = []
        task = asyncio.create_task(sink.append([labeled("1"), labeled("2")], saved=reported.append))
        await asyncio.to_thread(sink.started.wait, 30)
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation reach the append before the gate opens
        assert not task.done()
        sink.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        held = ids_in(sink)
        await sink.close()
        return held, reported

    assert asyncio.run(scenario()) == (["1", "2"], [2])
