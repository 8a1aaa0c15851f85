"""A self-hosted server that stalls (frozen longer than the timeout, as vLLM on busy cores does): the timeouts that
cluster are no rate limit to learn; auto concurrency backs off and finds the knee again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ratelimit.pacing import Pacer

from .helpers import ROOT, progress, reviews, sink_ids, start_cli, wait_for, write_csv

SLOTS = 8


@pytest.mark.crash
def test_a_server_frozen_past_the_timeout_teaches_no_rate_and_keeps_auto_near_its_slots(tmp_path: Path) -> None:
    """The simulator as a self-hosted server (8 slots, its own process) is frozen with SIGSTOP mid-run until the
    run's attempts time out in a cluster. The run goes on and labels every row once; it learns and remembers no
    rate (none was refused: a rate measured in a stall paced vLLM at 0.7 of what it serves, and the next run
    started there), and its window ends near the slots (paced by that rate, it grew to 5× them)."""
    port_file = tmp_path / "sim.port"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", "0", "--port-file", str(port_file),
         "--slots", str(SLOTS), "--slot-cost", "0.5", "--latency-ms", "40"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip() != "", what="the simulator's port")
        base_url = f"http://127.0.0.1:{int(port_file.read_text())}/v1"
        rows = reviews(1500)
        out = tmp_path / "out.jsonl"
        proc = start_cli(
            "label", "--input", str(write_csv(tmp_path / "in.csv", rows)), "--output", str(out),
            "--base-url", base_url, "--concurrency", "auto", "--no-progress", "--no-dedupe",
        )  # fmt: skip
        wait_for(lambda: progress(out).get("saved", 0) >= 300 or proc.poll() is not None, what="300 rows saved")
        os.kill(server.pid, signal.SIGSTOP)
        try:  # frozen until the run has seen its attempts time out (the progress file says so)
            wait_for(lambda: progress(out).get("timeouts", 0) >= 3 or proc.poll() is not None, timeout=60,
                     what="timeouts while the server is frozen")  # fmt: skip
        finally:
            os.kill(server.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, stdout + stderr
    ids = sink_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows), "every row exactly once"
    final = progress(out)
    assert "timed out in clusters" in stderr + stdout, "the stall was read as one (the path under test)"
    assert not (out.parent / f"{out.name}.meta" / "limits.json").exists(), "a stall is not a rate limit to remember"
    assert final["window"] <= 2 * SLOTS, final


def test_a_long_stall_halves_the_window_once_not_down_to_one() -> None:
    """Clustered timeouts keep coming while a server stays frozen: the window is halved once for the stall (halved
    on each, it reached 1 in a 45 s freeze, where three timeouts can no longer cluster and the rest used up the rows'
    retries); a reply, then a new stall, halves it again."""
    pacer = Pacer(ceiling=4096, auto=True)
    now = 0.0
    for _ in range(200):  # the window grows on a server that answers in 0.1 s
        now += 0.01
        pacer.on_success(0.1, window_limited=True, now=now)
    before = pacer.limit
    assert before > 20
    for _ in range(10):  # a cluster every few seconds while nothing comes back
        now += 5.0
        pacer.on_overload(now, until=now + 1.0, refused=False)
    assert pacer.limit == before // 2 or pacer.limit == (before + 1) // 2
    assert pacer.rate() is None and pacer.learned_rate is None, "a stall teaches no rate"
    now += 5.0
    pacer.on_success(0.1, window_limited=True, now=now)
    halved = pacer.limit
    now += 5.0
    pacer.on_overload(now, until=now + 1.0, refused=False)
    assert pacer.limit < halved
    for _ in range(20):  # a server that keeps stalling with a reply now and then: no cut goes under the floor
        now += 3.0
        limit = pacer.limit
        pacer.on_overload(now, until=now + 1.0, refused=False)
        assert pacer.limit >= min(limit, 4), "three timeouts must still be able to cluster"
        now += 1.5
        pacer.on_success(1.5, window_limited=True, now=now)


@pytest.mark.parametrize("auto", [True, False])
def test_held_timeouts_teach_no_rate_to_remember_429s_do(auto: bool) -> None:
    """With a fixed concurrency, or once a rate is known, clustered timeouts still slow the pace (a gateway holding
    requests over its limit), but neither the rate measured then nor a stall's length (as a lockout's) is kept
    for the next run; 429s teach a rate."""
    learned = {}
    for refused in (False, True):
        pacer = Pacer(ceiling=64, auto=auto)
        pacer.set_known_rate(None)
        now = 0.0
        for _ in range(300):  # 100 replies a second
            now += 0.01
            pacer.on_success(0.2, window_limited=True, now=now)
        if auto:  # a 429 earlier taught a rate (100/s): the pacer paces, the knee is out of it
            pacer.on_overload(now, until=now + 1.0)
            for _ in range(300):  # then the server slows to 50 replies a second
                now += 0.02
                pacer.on_success(0.2, window_limited=True, now=now)
        before, window = pacer.learned_rate, pacer.admissions.window
        for _ in range(4):  # a stall: overloads 2.5 s apart with nothing back in between (for 429s: a lockout)
            now += 2.5
            pacer.on_overload(now, until=now + 0.5, refused=refused)
        for _ in range(300):
            now += 0.02
            pacer.on_success(0.2, window_limited=True, now=now)
        learned[refused] = (before, pacer.learned_rate)
        if not refused:
            assert pacer.admissions.window == window, "a stall is no lockout: its length is not the provider's window"
    assert learned[False][1] == learned[False][0], learned
    assert learned[True][1] is not None and learned[True][1] != learned[True][0], learned


def test_a_long_stall_at_a_fixed_concurrency_keeps_a_window_that_can_still_time_out_in_clusters() -> None:
    """--concurrency 64, replies of 1 s, a 45 s freeze with a cluster of timeouts every 7 s (the timeout is 4 × the
    p99): nothing admitted is left to measure, so each cluster halves the window, but not under 4 (it fell to 1,
    where three timeouts cannot cluster and the rest use up the rows' retries)."""
    pacer = Pacer(ceiling=64, auto=False)
    now = 0.0
    for _ in range(600):
        now += 0.02
        pacer.on_success(1.0, window_limited=True, now=now)
    for _ in range(6):
        now += 7.0
        pacer.on_overload(now, until=now + 1.0, refused=False)
    assert pacer.limit >= 4


def test_held_timeouts_cancel_the_measure_a_429_left_waiting() -> None:
    """A 429, then a stall before its replies are back: the measure it waited for would count the seconds before the
    stall (16/s for a 50/s server, remembered for the next run); it is not taken."""
    pacer = Pacer(ceiling=64, auto=True)
    now = 0.0
    for _ in range(500):  # 50 replies a second at 0.2 s
        now += 0.02
        pacer.on_success(0.2, window_limited=True, now=now)
    pacer.on_overload(now, until=now + 0.1)
    now += 2.5
    pacer.on_overload(now, until=now + 1.0, refused=False)
    for _ in range(500):
        now += 0.02
        pacer.on_success(0.2, window_limited=True, now=now)
    assert pacer.learned_rate is None or pacer.learned_rate >= 40, pacer.learned_rate
