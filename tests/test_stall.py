"""A self-hosted server that stalls (frozen longer than the timeout, as vLLM on busy cores does): the timeouts that
cluster are no rate limit to learn; auto concurrency backs off and finds the knee again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert final["timeouts"] >= 3, final
    assert not (out.parent / f"{out.name}.meta" / "limits.json").exists(), "a stall is not a rate limit to remember"
    assert final["window"] <= 2 * SLOTS, final
