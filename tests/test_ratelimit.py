"""Rate limits over HTTP: the simulator enforces RPM/TPM like a provider; the run slows itself down and loses nothing.

The simulator's windows are shortened (window_seconds) so that a full window passes in seconds; its headers
still speak per minute, as a provider's do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import FatalApiError
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.sinks.meta import SinkMeta

from .helpers import dead_letters, ids_once, label, reviews, sink_ids, write_csv


def share_429(stats: dict[str, Any]) -> float:
    return stats["by_status"].get("429", 0) / max(1, stats["requests"])


@pytest.mark.wallclock
def test_retry_after_is_honoured(sim: Any, tmp_path: Path) -> None:
    """After a 429 with retry-after-ms 500, the next request reaches the server no sooner than 0.5 s later."""
    sim.script([{"kind": "status", "status": 429, "count": 1, "retry_after_ms": 500}])
    label(sim, write_csv(tmp_path / "in.csv", reviews(5)), tmp_path / "out.jsonl", concurrency=1)
    events = sim.stats()["events"]
    [t429] = [t for t, status, _ in events if status == 429]
    later = [t for t, status, _ in events if t > t429]
    assert later and min(later) >= t429 + 0.5


def test_429_storm_is_ridden_out_without_losing_rows(sim: Any, tmp_path: Path) -> None:
    """Forty 429s in a row: every row is labeled, none dead-lettered, and the storm does not multiply requests."""
    sim.script([{"kind": "status", "status": 429, "count": 40, "retry_after_ms": 30}])
    patient = RetryPolicy(max_attempts=30, base_wait=0.001, max_wait=0.01, timeout=5.0)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(50)), out, concurrency=20, retry=patient)
    assert summary.exit_code == 0 and dead_letters(out) == []
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(50))
    assert summary.rate_limited == 40
    assert sim.stats()["requests"] == 90


def test_quota_exhausted_stops_the_run(sim: Any, tmp_path: Path) -> None:
    """A 429 whose code is insufficient_quota is not a rate limit: the run stops with one clear message."""
    sim.script(
        [{"kind": "status", "status": 429, "count": -1, "code": "insufficient_quota", "type": "insufficient_quota"}]
    )
    with pytest.raises(FatalApiError, match="out of quota"):
        label(sim, write_csv(tmp_path / "in.csv", reviews(100)), tmp_path / "out.jsonl")
    assert sim.stats()["requests"] <= 10


@pytest.mark.wallclock
@pytest.mark.parametrize("given", [True, False], ids=["with --rpm", "learned from headers"])
def test_rpm_limit_is_kept_without_tuning(sim: Any, tmp_path: Path, given: bool) -> None:
    """Concurrency 100 under a 1200 RPM provider: every row labeled, at most 5% of requests answered 429."""
    sim.configure(rpm=1200, window_seconds=6, latency_ms=20)
    limits = LimitSettings(concurrency=100, rpm=1200 if given else None)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(240)), out, limits=limits)
    stats = sim.stats(events=False)
    assert summary.exit_code == 0
    assert len(ids_once(out)) == 240
    assert share_429(stats) <= 0.05


@pytest.mark.wallclock
def test_tpm_limit_with_long_documents(sim: Any, tmp_path: Path) -> None:
    """Long documents with --tpm under the provider's limit: token estimates pace the run, every row labeled, no 429s.

    The provider allows 20% more than --tpm: a 6 s test window is short next to the one-second burst a bucket
    allows, which a real 60 s window absorbs.
    """
    sim.configure(tpm=360_000, window_seconds=6, latency_ms=20)
    rows = [(f"d{i}", "en", f"document {i}: " + "lorem ipsum dolor sit amet " * 150) for i in range(40)]
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), out, limits=LimitSettings(concurrency=50, tpm=300_000))
    assert summary.exit_code == 0 and len(ids_once(out)) == 40
    assert share_429(sim.stats(events=False)) == 0
    assert summary.prompt_tokens > 30_000


@pytest.mark.wallclock
def test_auto_concurrency_grows_to_what_the_limit_allows(sim: Any, tmp_path: Path) -> None:
    """With slow replies (300 ms) and a 6000 RPM limit, auto reaches ≥ 0.8 of the limit; a fixed 10 could reach 1/3."""
    sim.configure(rpm=6000, window_seconds=6, latency_ms=300)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(700)), out, limits=LimitSettings.automatic())
    assert summary.exit_code == 0 and len(ids_once(out)) == 700
    stats = sim.stats()
    arrivals = sorted(t for t, status, _ in stats["events"] if status == 200)
    # Steady state: the middle of the run, after the ramp and before the tail.
    middle = arrivals[200:600]
    rate = (len(middle) - 1) / (middle[-1] - middle[0])
    assert rate >= 0.8 * 6000 / 60
    assert stats["max_in_flight"] >= 25
    assert share_429(stats) <= 0.05


def test_hung_request_is_abandoned_and_retried(sim: Any, tmp_path: Path) -> None:
    """A request that never gets an answer is given up after --timeout and retried; its worker is not stuck."""
    sim.script([{"kind": "hang", "count": 1}])
    quick = RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=0.5)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(6)), out, concurrency=1, retry=quick)
    assert summary.exit_code == 0
    assert ids_once(out) == {r[0] for r in reviews(6)}
    assert summary.retries == 1 and summary.timeouts == 1
    assert summary.failures == {}
    assert sim.stats(events=False)["requests"] == 7, "six rows and one retry of the hung one"


def test_a_row_that_always_fails_keeps_its_last_error(sim: Any, tmp_path: Path) -> None:
    """A row answered 503 every time is dead-lettered after --max-retries with the last status and message."""
    sim.script([{"kind": "status", "status": 503, "count": -1, "match": "review 4:"}])
    out = tmp_path / "out.jsonl"
    retry = RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=5.0)
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(6)), out, retry=retry)
    assert summary.exit_code == 1
    [letter] = dead_letters(out)
    assert (letter["id"], letter["kind"], letter["status"], letter["attempts"]) == ("r00004", "server_error", 503, 3)
    assert "overloaded" in letter["message"]


def per_second(stats: dict[str, Any]) -> dict[int, int]:
    """Successful requests per second of the simulator's own clock, from its event log."""
    counts: dict[int, int] = {}
    for t, status, _ in stats["events"]:
        if status == 200:
            counts[int(t)] = counts.get(int(t), 0) + 1
    return counts


def steady(stats: dict[str, Any]) -> float:
    """Successes per second between the 20th and 80th percentile of their arrival times."""
    times = sorted(t for t, status, _ in stats["events"] if status == 200)
    lo, hi = int(len(times) * 0.2), int(len(times) * 0.8)
    return (hi - lo) / (times[hi] - times[lo])


@pytest.mark.wallclock
def test_an_announced_limit_is_reached_in_the_second_round_trip_at_any_latency(sim: Any, tmp_path: Path) -> None:
    """4,800 RPM announced in headers, 1.5 s replies: within three round trips the run admits ≥ 80% of the limit
    in a second (growing the window by ones would need minutes), and holds ≥ 0.9 of it with no 429 storm."""
    sim.configure(rpm=4800, latency_ms=1500)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(1000)), out, limits=LimitSettings.automatic())
    assert summary.exit_code == 0 and len(ids_once(out)) == 1000
    stats = sim.stats()
    counts = per_second(stats)
    limit = 4800 / 60
    first = int(min(t for t, _, _ in stats["events"]))
    assert max(counts.get(first + s, 0) for s in range(1, 5)) >= 0.8 * limit, counts
    assert steady(stats) >= 0.9 * limit
    assert share_429(stats) <= 0.02
    assert stats["max_in_flight"] >= 0.9 * limit * 1.5


@pytest.mark.wallclock
def test_without_any_rate_headers_429s_stay_rare(sim: Any, tmp_path: Path) -> None:
    """A provider that says nothing but 429 (no headers, no retry-after) and counts refused requests: the run learns
    the rate from the first overload, keeps 429s ≤ 5% and goodput ≥ 0.85, and labels every row."""
    sim.configure(rpm=2400, latency_ms=100, rate_headers="none")
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(800)), out, limits=LimitSettings.automatic())
    assert summary.exit_code == 0 and len(ids_once(out)) == 800
    stats = sim.stats()
    assert share_429(stats) <= 0.05
    assert steady(stats) >= 0.85 * 2400 / 60


@pytest.mark.wallclock
def test_the_http_pool_holds_more_than_a_thousand_requests(sim: Any, tmp_path: Path) -> None:
    """--concurrency 1100 under a high --rpm really has 1,100 requests in flight (the SDK's pool stopped at 1,000)."""
    sim.configure(latency_ms=6000)  # long enough that the 1,100th request leaves before the first returns
    out = tmp_path / "out.jsonl"
    limits = LimitSettings(concurrency=1100, rpm=120_000)  # Little's law: the window jumps to the ceiling
    patient = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=60.0)
    # 1,100 rows, one wave: all can be in flight at once, and a pool capped at 1,000 shows as exactly 1,000 (checked).
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(1100)), out, limits=limits, retry=patient)
    assert summary.exit_code == 0
    assert sim.stats(events=False)["max_in_flight"] > 1000


@pytest.mark.wallclock
def test_a_resumed_run_starts_at_the_rate_the_last_one_learned(sim: Any, tmp_path: Path) -> None:
    """A provider that says nothing, 1,200 RPM: the first run learns the rate from its 429s and keeps it in the sink's
    side folder; the resumed run paces at it from its first request: no slow start to relearn it, 429s stay rare."""
    sim.configure(rpm=1200, latency_ms=50, rate_headers="none")
    rows = reviews(400)
    out = tmp_path / "out.jsonl"
    first = label(sim, write_csv(tmp_path / "first.csv", rows[:150]), out, limits=LimitSettings.automatic())
    assert first.exit_code == 0 and share_429(sim.stats(events=False)) > 0, "the first run learns from 429s"
    remembered = json.loads(SinkMeta(out).limits_path.read_text())
    assert remembered["model"] == "gpt-4o-mini" and "x-api-key" not in str(remembered)
    rate = remembered["rate"]
    sim.reset()
    sim.configure(rpm=1200, latency_ms=50, rate_headers="none")
    resumed = label(sim, write_csv(tmp_path / "all.csv", rows), out, limits=LimitSettings.automatic())
    assert resumed.exit_code == 0 and len(ids_once(out)) == 400
    stats = sim.stats()
    # Paced just under the remembered rate from the first request, 429s stay at the bound (≤ 2%). Not zero:
    # on a loaded machine an event-loop stall lets two requests leave together at the limit (seen in CI: 2 of 252).
    assert share_429(stats) <= 0.02, stats["by_status"]
    start = min(t for t, _, _ in stats["events"])
    first_second = sum(1 for t, status, _ in stats["events"] if status == 200 and t < start + 1.0)
    assert 0.8 * rate <= first_second <= rate + 1, (first_second, rate)
