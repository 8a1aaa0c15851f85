"""Shards on one key pass on their part of its limits when they end (ratelimit/share.py), no coordinator involved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.input.shards import Shard, shard_of
from pipeline.ratelimit.limiter import SAFETY, Limiter, LimitSettings
from pipeline.ratelimit.share import READS_PER_LOOK, START_GRACE, ShareFollower
from pipeline.sinks.meta import SinkMeta

from .helpers import label, reviews, write_csv


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_progress(out: Path, shard: Shard, state: str, *, age: float = 0.0, pid: int | None = None) -> None:
    meta = SinkMeta(out, shard)
    meta.ensure()
    updated = datetime.now(UTC) - timedelta(seconds=age)
    doc = {"state": state, "pid": pid or os.getpid(), "host": socket.gethostname(), "updated_at": updated.isoformat()}
    meta.progress_path.write_bytes(orjson.dumps(doc))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_shard_takes_the_part_of_siblings_that_ended_stopped_or_went_silent(tmp_path: Path) -> None:
    """Shard 0 of 4 at 1/4: a done sibling leaves its part, one whose progress stops moving for 20 s (by this
    shard's clock) too; one not started yet keeps its part; one that comes back takes it back. Nothing changes in
    the first seconds of a run."""
    out = tmp_path / "out.parquet"
    clock = Clock()
    follower = ShareFollower(out, Shard(0, 4), 0.25, clock=clock)
    write_progress(out, Shard(1, 4), "done")
    write_progress(out, Shard(2, 4), "running")
    assert follower.refresh() is None, "siblings started with this run may not have written progress yet"
    clock.now += START_GRACE
    assert follower.refresh() == pytest.approx(1 / 3), "shard 1 is done; shard 3 has not started"
    clock.now += 10
    assert follower.refresh() is None, "shard 2 silent for 10 s is still running"
    clock.now += 10
    assert follower.refresh() == pytest.approx(1 / 2), "shard 2 silent for 20 s is gone"
    write_progress(out, Shard(2, 4), "running")
    clock.now += 3
    assert follower.refresh() == pytest.approx(1 / 3), "shard 2 moves again: it takes its part back"
    write_progress(out, Shard(3, 4), "running", age=3600.0, pid=dead_pid())
    clock.now += 3
    assert follower.refresh() is None, "shard 3 starts: an old clock or a pid elsewhere proves nothing at first sight"
    write_progress(out, Shard(1, 4), "running")
    clock.now += 3
    assert follower.refresh() == pytest.approx(1 / 4), "shard 1 resumes: all four run"
    write_progress(out, Shard(1, 4), "interrupted")
    clock.now += 3
    assert follower.refresh() == pytest.approx(1 / 3), "interrupted is as gone as done"


@pytest.mark.slow
def test_two_hundred_live_siblings_read_in_turn_are_never_taken_for_gone(tmp_path: Path) -> None:
    """200 shards, all alive and writing progress: each sibling is read only every 13 looks (40 s), yet none is
    taken for silent, so the share stays at 1/200 and the key is not overrun."""
    out = tmp_path / "out.jsonl"
    clock = Clock()
    shards = [Shard(k, 200) for k in range(200)]
    follower = ShareFollower(out, shards[0], 1 / 200, clock=clock)
    clock.now += START_GRACE
    for _ in range(30):
        for shard in shards[1:]:
            write_progress(out, shard, "running")
        assert follower.refresh() is None
        assert follower.running() == 200
        clock.now += 3.0


def test_each_look_reads_a_bounded_number_of_progress_files(tmp_path: Path) -> None:
    """With 41 shards, a look reads 16 siblings in turn (not 40): the last shard running learns that the 40
    others are done over three looks, then takes the whole key."""
    out = tmp_path / "out.jsonl"
    clock = Clock()
    for k in range(1, 41):
        write_progress(out, Shard(k, 41), "done")
    follower = ShareFollower(out, Shard(0, 41), 1 / 41, clock=clock)
    clock.now += START_GRACE
    follower.refresh()
    assert follower.running() == 41 - READS_PER_LOOK
    for _ in range(2):
        clock.now += 5
        follower.refresh()
    assert follower.running() == 1 and follower.share == 1.0


def test_the_share_scales_the_known_limits_and_what_429s_taught_both_ways() -> None:
    """600 RPM at 1/4 paces at 142.5 RPM, a 429 cuts that by 5%; the share growing to 1/2 doubles the pace at once
    (the cut included: it was this process's part), and shrinking back restores it exactly (a flapping share
    loses nothing it learned). Token limits learned later follow the share too."""
    limiter = Limiter(LimitSettings(concurrency=50, rpm=600, share=0.25))
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(150 * SAFETY)
    limiter.on_rate_limited(0.1)
    cut = 150 * SAFETY * 0.95
    assert limiter._rpm.per_minute == pytest.approx(cut)
    limiter.set_share(0.5)
    assert limiter._rpm.per_minute == pytest.approx(2 * cut)
    limiter.set_share(0.25)
    assert limiter._rpm.per_minute == pytest.approx(cut)
    limiter.set_share(0.5)
    limiter.observe_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "40000"})
    assert limiter._tpm is not None and limiter._tpm.per_minute == pytest.approx(20_000 * SAFETY)
    limiter.set_share(1.0)
    assert limiter._tpm.per_minute == pytest.approx(40_000 * SAFETY)
    assert limiter._rpm.per_minute == pytest.approx(4 * cut)


@pytest.mark.wallclock
def test_the_last_shard_running_paces_at_the_whole_limit(sim: Any, tmp_path: Path) -> None:
    """2 shards on a 1,200 RPM key: shard 1 has finished, so shard 0 (at 1/2 while it cannot yet be sure) takes
    the whole limit after its first seconds: the simulator sees it send about twice as fast, with no 429s."""
    sim.configure(rpm=1200, latency_ms=50)
    rows = reviews(360)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    limits = LimitSettings(concurrency=40, rpm=1200, share=0.5)
    few = write_csv(tmp_path / "few.csv", [r for r in rows if shard_of(r[0], 2) == 1][:20])
    assert label(sim, few, out, limits=limits, shard=Shard(1, 2)).exit_code == 0
    sim.reset()
    summary = label(sim, source, out, limits=limits, shard=Shard(0, 2))
    assert summary.exit_code == 0 and summary.labeled > 150
    progress = orjson.loads(SinkMeta(out, Shard(0, 2)).progress_path.read_bytes())
    assert progress["rate_share"] == 1.0
    stats = sim.stats()
    times = sorted(t for t, status, _ in stats["events"] if status == 200)
    first = times[0]
    early = sum(1 for t in times if first + 2 <= t < first + 8) / 6
    late = [t for t in times if t >= first + START_GRACE + 2]
    assert len(late) > 20
    late_rate = (len(late) - 1) / (late[-1] - late[0])
    assert early <= 0.55 * 20, f"{early:.1f}/s at 1/2 of 20/s"
    assert late_rate >= 0.8 * 20, f"{late_rate:.1f}/s once alone on the key"
    assert stats["by_status"].get("429", 0) <= 0.02 * stats["requests"]
