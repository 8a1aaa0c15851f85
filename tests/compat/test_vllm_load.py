"""`--concurrency auto` against a real server with a fixed number of slots (vLLM queues what it cannot run)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ..helpers import TEST_KEY, progress, sink_ids, start_cli
from .common import CONFIG, latency_figures, record_result, sample_csv
from .servers import MAX_NUM_SEQS, VLLM

# Enough rows for the steady state to outweigh auto's first round trips (~15 s a run on 2 quiet cores).
ROWS = 1000


def measured_run(vllm: VLLM, folder: Path, concurrency: str) -> dict[str, Any]:
    """Label ROWS rows at `concurrency`, watching the progress file for the most requests in flight."""
    folder.mkdir()
    inp = sample_csv(folder / "in.csv", ROWS)
    out = folder / "out.jsonl"
    args = ["--input", str(inp), "--output", str(out), "--config", str(CONFIG), "--model", "tiny"]
    args += ["--base-url", vllm.base_url, "--concurrency", concurrency, "--no-progress"]
    args += ["--no-dedupe"]  # every row is a request: the sample repeats texts, and the load is what is measured
    before = vllm.chat_requests()
    started = time.monotonic()
    proc = start_cli("label", *args, env={"OPENAI_API_KEY": TEST_KEY})
    peak = window = 0
    deadline = started + 600
    while proc.poll() is None and time.monotonic() < deadline:
        now = progress(out)
        peak = max(peak, int(now.get("in_flight", 0) or 0))
        window = max(window, int(now.get("window", 0) or 0))
        time.sleep(0.2)  # sampling the progress file (written ~1/s) while the run goes on, not waiting for it
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - started
    assert proc.returncode == 0, stdout + stderr
    assert len(sink_ids(out)) == ROWS
    return {
        "concurrency": concurrency,
        "rows_per_s": round(ROWS / wall, 2),
        "peak_in_flight": peak,
        "peak_window": window,
        "requests": vllm.chat_requests() - before,
        **latency_figures(out),
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one concurrency as one: rows/s over their summed time, the worst peak, p99 and request count."""
    return {
        "concurrency": runs[0]["concurrency"],
        "rows_per_s": round(len(runs) * ROWS / sum(ROWS / run["rows_per_s"] for run in runs), 2),
        "peak_in_flight": max(run["peak_in_flight"] for run in runs),
        "peak_window": max(run["peak_window"] for run in runs),
        "requests": max(run["requests"] for run in runs),
        "p99_s": max(run["p99_s"] for run in runs),
        "runs": [run["rows_per_s"] for run in runs],
    }


@pytest.fixture(scope="module")
def fixed_and_auto(vllm: VLLM, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same rows at --concurrency = the server's slots and at auto, alternating, twice each (on 2 shared cores
    one fixed run alone moved from 46 to 87 rows/s between runs); figures go to the results file."""
    folder = tmp_path_factory.mktemp("vllm-load")
    runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "auto": []}
    for turn in range(2):
        runs["fixed"].append(measured_run(vllm, folder / f"fixed{turn}", str(MAX_NUM_SEQS)))
        runs["auto"].append(measured_run(vllm, folder / f"auto{turn}", "auto"))
    fixed, auto = pooled(runs["fixed"]), pooled(runs["auto"])
    record_result("vllm_auto_vs_fixed", slots=MAX_NUM_SEQS, rows=ROWS, fixed=fixed, auto=auto)
    return fixed, auto


def test_fixed_concurrency_at_the_slots_stays_within_them(fixed_and_auto: tuple[dict[str, Any], ...]) -> None:
    """At --concurrency equal to vLLM's slots every row is labeled with at most that many in flight (auto's yardstick).

    Not "one request per row": on 2 cores shared with other work a reply can outlast the adaptive timeout.
    """
    fixed, _ = fixed_and_auto
    assert fixed["requests"] >= ROWS
    assert fixed["peak_in_flight"] <= MAX_NUM_SEQS


def test_auto_stays_near_the_knee_of_the_servers_slots(fixed_and_auto: tuple[dict[str, Any], ...]) -> None:
    """Auto keeps in flight near vLLM's slots (the old rule queued ~950 against 128), with no re-sends, at ≥ 0.85 of
    the slots' throughput (two runs of each, pooled). The DESIGN target (≥ 0.95 at p99 ≤ 1.5×) is recorded, not
    asserted here (docs/compat.md); tests/test_knee.py asserts it in virtual time."""
    fixed, auto = fixed_and_auto
    assert auto["peak_in_flight"] <= 2 * MAX_NUM_SEQS, (fixed, auto)
    assert auto["requests"] == ROWS, (fixed, auto)
    assert auto["rows_per_s"] >= 0.85 * fixed["rows_per_s"], (fixed, auto)
