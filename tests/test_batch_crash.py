"""The batch engine under kill -9 with real processes: no row is ever submitted twice, none is lost.

The simulator counts how often each custom_id reached its Batch API, so "never twice" is checked, not assumed.
Besides kills at random moments, three tests kill at the exact gaps a record cannot cover by itself: the
provider has the upload, the batch, or is sending the results, and the client has not heard back yet.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    cli,
    ids_once,
    kill_at_random_moments,
    label_args,
    ledger,
    reviews,
    sink_ids,
    start_cli,
    wait_for,
    write_csv,
)

pytestmark = pytest.mark.crash  # every test here kills or signals the real CLI


def batch_args(sim: Any, source: Path, output: Path, *extra: str) -> list[str]:
    return label_args(sim, source, output, "--engine", "batch", "--poll-interval", "0.05", *extra)


def submissions(sim: Any) -> Counter[str]:
    return Counter(sim.batch_summary()["submissions"])


def kill(proc: Any) -> None:
    proc.kill()
    proc.communicate(timeout=30)


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_kill_9_at_random_moments_never_submits_a_row_twice(sim: Any, tmp_path: Path, name: str) -> None:
    """SIGKILLs at random moments of submit, poll and ingest: no custom_id submitted twice, each id once at the end."""
    rng = random.Random(f"batch-crash-{name}")
    # Every step takes a little while, so kills land in all of them: uploads, creates, polls, downloads.
    # 30 batches of ~0.2 s to submit and 0.1 s to download: the job takes several runs on any machine.
    sim.configure(batch_seconds=2.0, upload_reply_seconds=0.1, create_reply_seconds=0.1, content_reply_seconds=0.1)
    rows = reviews(3000)
    wanted = sorted(r[0] for r in rows)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name

    def check() -> None:
        seen = sink_ids(out) if out.exists() else []
        assert len(seen) == len(set(seen)), "an id was written twice"
        assert max(submissions(sim).values(), default=0) <= 1, "a row was submitted twice"

    kills = kill_at_random_moments(
        lambda: start_cli(*batch_args(sim, source, out, "--batch-size", "100")), rng, between=(0.5, 3.0), check=check
    )
    assert kills >= 4, "too few kills landed mid-run to test anything"
    final = cli(*batch_args(sim, source, out))
    assert final.returncode == 0, final.stderr
    assert sorted(sink_ids(out)) == wanted
    assert submissions(sim) == Counter(wanted)
    assert all(s["state"] == "collected" for s in ledger(out)["submissions"])


def test_kill_after_the_provider_made_the_batch_but_before_the_reply(sim: Any, tmp_path: Path) -> None:
    """Killed while the create reply is in flight: the re-run finds the batch by its submission id, makes none."""
    sim.configure(create_reply_seconds=60, batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(50))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*batch_args(sim, source, out))
    try:
        wait_for(lambda: len(sim.batch_summary()["batches"]) == 1, what="the provider to create the batch")
    finally:
        kill(proc)
    assert [s["state"] for s in ledger(out)["submissions"]] == ["creating"]
    sim.configure(create_reply_seconds=0)
    result = cli(*batch_args(sim, source, out))
    assert result.returncode == 0, result.stderr
    assert len(sim.batch_summary()["batches"]) == 1, "a second batch was created"
    assert submissions(sim) == Counter(r[0] for r in reviews(50))
    assert len(ids_once(out)) == 50


def test_kill_after_the_upload_but_before_the_reply(sim: Any, tmp_path: Path) -> None:
    """Killed while the upload reply is in flight: the re-run uploads again and still creates one batch."""
    sim.configure(upload_reply_seconds=60, batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(50))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*batch_args(sim, source, out))
    try:
        wait_for(lambda: sim.batch_summary()["files"] == 1, what="the provider to store the upload")
    finally:
        kill(proc)
    assert [s["state"] for s in ledger(out)["submissions"]] == ["prepared"]
    sim.configure(upload_reply_seconds=0)
    result = cli(*batch_args(sim, source, out))
    assert result.returncode == 0, result.stderr
    assert len(sim.batch_summary()["batches"]) == 1
    assert submissions(sim) == Counter(r[0] for r in reviews(50))
    assert len(sink_ids(out)) == 50


def test_kill_while_downloading_results_loses_nothing(sim: Any, tmp_path: Path) -> None:
    """Killed while the output file downloads: the batch stays submitted; the re-run collects it exactly once."""
    sim.configure(content_reply_seconds=60, batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(50))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*batch_args(sim, source, out))
    try:
        wait_for(lambda: sim.batch_summary()["downloads"] >= 1, what="the download to begin")
    finally:
        kill(proc)
    assert [s["state"] for s in ledger(out)["submissions"]] == ["submitted"]
    assert not out.exists() or sink_ids(out) == []
    sim.configure(content_reply_seconds=0)
    result = cli(*batch_args(sim, source, out))
    assert result.returncode == 0, result.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(50))
    assert len(sim.batch_summary()["batches"]) == 1 and max(submissions(sim).values()) == 1


def test_ctrl_c_while_waiting_leaves_the_batches_running(sim: Any, tmp_path: Path) -> None:
    """SIGINT while waiting exits 130 with the batches still at the provider; the same command collects them."""
    sim.configure(batch_seconds=3600)
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*batch_args(sim, source, out))
    wait_for(lambda: [s.get("state") for s in ledger(out).get("submissions", [])] == ["submitted"], what="a batch")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "keep running" in stderr and "resume with" in stderr
    sim.configure(batch_seconds=0)
    result = cli(*batch_args(sim, source, out))
    assert result.returncode == 0, result.stderr
    assert len(sink_ids(out)) == 40 and len(sim.batch_summary()["batches"]) == 1
