"""The progress file has one owner (sinks/progress_file.py): versioned, read the same by every reader, never fatal."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.analysis.status import sink_status
from pipeline.input.shards import Shard
from pipeline.run.lifecycle import Run
from pipeline.run.options import RunOptions
from pipeline.run.summary import Summary, combine
from pipeline.sinks.meta import SinkMeta
from pipeline.sinks.progress_file import SCHEMA, RunState, last_state, read_progress, run_state, write_progress

from .helpers import SENTIMENT, label, reviews, write_csv

GARBLED = [b"", b'{"state": "do', b"\xff\xfe not json", b"[1, 2]", b'"done"']


def test_the_states_are_the_strings_old_files_hold() -> None:
    """Files written before the enum keep their meaning: each state is still the same string on disk."""
    old = {"running", "stopping", "waiting", "done", "interrupted", "failed", "budget", "stale", "not started"}
    assert {state.value for state in RunState} == old
    assert orjson.loads(orjson.dumps({"state": RunState.BUDGET})) == {"state": "budget"}


def test_a_run_writes_a_versioned_progress_file(sim: Any, tmp_path: Path) -> None:
    """A finished run's progress file carries the schema version, the host, its state and its summary."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "in.csv", reviews(5)), out)
    doc = read_progress(SinkMeta(out).progress_path)
    assert doc is not None
    assert doc["schema"] == SCHEMA and doc["state"] == "done" and doc["host"]
    assert Summary.from_dict(doc["summary"]).labeled == 5


@pytest.mark.parametrize("content", GARBLED)
def test_a_torn_or_garbled_progress_file_reads_as_none(tmp_path: Path, content: bytes) -> None:
    """A torn, garbled or non-object progress file is no document, and `compact`'s check says so."""
    meta = SinkMeta(tmp_path / "out.parquet", Shard(0, 2))
    meta.ensure()
    meta.progress_path.write_bytes(content)
    assert read_progress(meta.progress_path) is None
    assert last_state(meta) == "no progress file"
    assert run_state(None, datetime.now(UTC)) == RunState.STALE


def test_an_unreadable_progress_file_crashes_neither_status_nor_compact(tmp_path: Path) -> None:
    """A progress path that cannot be read at all (here a directory) is "no progress file", not a traceback."""
    meta = SinkMeta(tmp_path / "out.parquet", Shard(1, 2))
    meta.ensure()
    meta.progress_path.mkdir()
    assert last_state(meta) == "no progress file"
    assert read_progress(meta.progress_path) is None
    report = sink_status(tmp_path / "out.parquet")
    assert report["shards_by_state"]["stale"] == ["1/2"]
    assert orjson.loads(orjson.dumps(report))["shards_by_state"]["stale"] == ["1/2"]


def test_write_progress_is_never_fatal(tmp_path: Path) -> None:
    """Progress is a convenience: a progress file that cannot be written leaves the run going."""
    meta = SinkMeta(tmp_path / "out.jsonl")
    meta.ensure()
    meta.progress_path.mkdir()  # the rename onto it fails
    write_progress(meta, {"state": RunState.RUNNING})
    assert meta.progress_path.is_dir()


def part(state: str) -> Summary:
    return Summary.from_dict({"state": state, **dict.fromkeys(_COUNTS, 0), "elapsed_s": 1.0, "cost_usd": None})


_COUNTS = (
    "labeled", "failed", "saved", "skipped_done", "duplicates", "conflicts", "changed", "truncated", "retries",
    "rate_limited", "prompt_tokens", "completion_tokens",
)  # fmt: skip


@pytest.mark.parametrize(
    ("states", "worst"),
    [
        (["done", "interrupted"], "interrupted"),
        (["interrupted", "budget"], "budget"),
        (["budget", "failed"], "failed"),
        (["failed", "budget"], "failed"),
        (["done", "budget", "done"], "budget"),
    ],
)
def test_the_combined_state_is_the_worst_shards(states: list[str], worst: str) -> None:
    """--procs: a shard stopped at --max-cost outranks an interrupted one, and an error outranks both."""
    summary = combine([part(s) for s in states], output="o", dead_letters="d", resume="r", elapsed_s=1.0)
    assert summary.state == worst


def test_combined_parts_add_up_batch_counts_cached_tokens_and_every_cost() -> None:
    """Shards (--procs) and auto's two runs are added up by one function: batch counts, cached tokens and the
    standard-price cost add up too, and a part without a price leaves the total to the others."""
    one = dataclasses.replace(part("done"), batches=2, submitted=40, cached_tokens=7, cost_usd=0.5,
                              standard_cost_usd=1.0, copies=3, copy_saving_usd=0.25)  # fmt: skip
    two = dataclasses.replace(part("done"), batches=1, submitted=10, cached_tokens=5, cost_usd=0.25,
                              standard_cost_usd=None, copies=1)  # fmt: skip
    summary = combine([one, two], output="o", dead_letters="d", resume="r", elapsed_s=1.0)
    assert (summary.batches, summary.submitted, summary.cached_tokens, summary.copies) == (3, 50, 12, 4)
    assert (summary.cost_usd, summary.standard_cost_usd, summary.copy_saving_usd) == (0.75, 1.0, 0.25)


def test_a_waiting_batch_run_that_died_reads_as_stale() -> None:
    """A batch run waiting on its batches is alive while it refreshes its file; killed (its pid gone on this host,
    or its file not refreshed for minutes) it reads as stale, not "waiting" forever."""
    now = datetime.now(UTC)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    fresh = {"state": "waiting", "pid": os.getpid(), "host": socket.gethostname(), "updated_at": now.isoformat()}
    assert run_state(fresh, now) == RunState.WAITING
    assert run_state({**fresh, "pid": int(gone.stdout)}, now) == RunState.STALE
    old = datetime(2020, 1, 1, tzinfo=UTC).isoformat()
    assert run_state({**fresh, "host": "elsewhere", "updated_at": old}, now) == RunState.STALE


class _IdleEngine:
    """An engine that sends nothing: enough to drive `Run` through its start and its end."""

    name, tier, after_stop = "idle", "standard", ""

    def check(self, opts: RunOptions) -> None: ...
    async def execute(self, run: Run) -> None: ...
    def stop(self, run: Run, signals: int) -> bool:
        return True

    def progress(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


def test_a_progress_write_that_outlives_the_run_never_replaces_its_end(tmp_path: Path) -> None:
    """The ticker's thread may still be writing "running" when the run writes how it ended (cancelling the ticker
    does not stop the thread): that late write must not land, or a finished shard reads "running" (CI, stop 24)."""
    out = tmp_path / "out.jsonl"
    opts = RunOptions.build(write_csv(tmp_path / "in.csv", reviews(3)), out, SENTIMENT, progress="off")
    run = Run(opts, _IdleEngine(), notice=io.StringIO())
    asyncio.run(run.execute())
    state = lambda: (read_progress(SinkMeta(out).progress_path) or {}).get("state")  # noqa: E731
    assert state() == RunState.DONE
    run.write_progress(RunState.RUNNING)  # what the ticker's thread does if it began just before the end
    assert state() == RunState.DONE
