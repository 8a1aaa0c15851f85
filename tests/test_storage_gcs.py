"""Outputs on gs:// against fake-gcs-server on loopback: the lease's preconditions, resume, kill -9, clear errors."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.sinks.storage import ObjectStore

from .gcs import GcsBucket
from .gcs import gcs_bucket as gcs_bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .gcs import gcs_server as gcs_server  # noqa: PLC0414
from .helpers import cli, kill_at_random_moments, reviews, start_cli, wait_for, write_csv
from .test_storage import label_args


def test_the_emulator_refuses_a_second_create_if_absent(gcs_bucket: GcsBucket) -> None:
    """The lease's GCS writes are atomic: a second create-if-absent and a replace of a stale generation get 412."""
    writes = ObjectStore(gcs_bucket.uri("x"), {"endpoint_override": gcs_bucket.endpoint}).writes()
    key = f"{gcs_bucket.name}/cond/lease.json"
    first = writes.create(key, b"one")
    assert first is not None
    assert writes.create(key, b"two") is None, "a second create-if-absent succeeded: the lease would not be atomic"
    second = writes.replace(key, b"three", first)
    assert second is not None and second != first
    assert writes.replace(key, b"four", first) is None, "a replace of a stale generation succeeded"
    found = writes.read(key)
    assert found is not None and (found.data, found.etag) == (b"three", second)
    assert found.now >= found.modified.replace(microsecond=0), "the store's clock comes from its reply"


def test_label_into_gs_then_resume_sends_nothing(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """A run into gs:// writes each id once in whole parts and gives its lease back; a second run sends nothing."""
    rows = reviews(120)
    source = write_csv(tmp_path / "in.csv", rows)
    out = gcs_bucket.uri("runs/labels.parquet")
    result = cli(*label_args(sim, source, out), env=gcs_bucket.env)
    assert result.returncode == 0, result.stderr
    assert sorted(gcs_bucket.ids("runs/labels.parquet")) == sorted(r[0] for r in rows)
    meta = gcs_bucket.keys("runs/labels.parquet.meta/")
    assert "runs/labels.parquet.meta/manifest.json" in meta
    assert "runs/labels.parquet.meta/lease.json" not in meta, "the lease outlived the run"
    assert all(k.endswith(".parquet") for k in gcs_bucket.keys("runs/labels.parquet/"))
    sim.reset()
    again = cli(*label_args(sim, source, out), env=gcs_bucket.env)
    assert again.returncode == 0, again.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.crash
def test_kill_9_into_gs_then_resume_gives_each_id_once(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """SIGKILLs at random moments into gs://: readers never see an id twice; the last run completes the set."""
    sim.configure(latency_ms=20)
    rows = reviews(1500)
    source = write_csv(tmp_path / "in.csv", rows)
    out = gcs_bucket.uri("crash/out.parquet")

    def no_id_twice() -> None:
        seen = gcs_bucket.ids("crash/out.parquet")
        assert len(seen) == len(set(seen)), "an id was written twice"

    run = label_args(sim, source, out, "--concurrency", "8")
    kills = kill_at_random_moments(
        lambda: start_cli(*run, env=gcs_bucket.env), random.Random("crash-gs"), between=(1.0, 3.0), check=no_id_twice,
        most=3,
    )  # fmt: skip
    assert kills >= 2, "too few kills landed mid-run to test anything"
    # The killed runs' leases name a dead pid on this host, so the resume takes over without waiting.
    result = cli(*label_args(sim, source, out), env=gcs_bucket.env)
    assert result.returncode == 0, result.stderr
    assert sorted(gcs_bucket.ids("crash/out.parquet")) == sorted(r[0] for r in rows)
    assert not [k for k in gcs_bucket.keys("crash/") if "tmp" in k]


@pytest.mark.crash
def test_second_writer_on_gs_is_refused(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """A second run on the same gs:// output stops at once, naming the holder's pid and host and the lease's end."""
    sim.configure(latency_ms=200)
    source = write_csv(tmp_path / "in.csv", reviews(400))
    out = gcs_bucket.uri("two/out.parquet")
    first = start_cli(*label_args(sim, source, out, "--concurrency", "2"), env=gcs_bucket.env)
    try:
        wait_for(lambda: "two/out.parquet.meta/lease.json" in gcs_bucket.keys("two/"), what="the first run's lease")
        second = cli(*label_args(sim, source, out), env=gcs_bucket.env, timeout=60)
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.kill()
        first.communicate(timeout=30)
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert "holds the lease until" in second.stderr


def test_expired_lease_on_gs_is_taken_over(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """A lease another host stopped renewing (expired by the store's clock) is taken over, and the run says so;
    a live one of another host refuses the run."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    lease = {"host": "node-that-died", "pid": 4242, "token": "feedbeef", "seconds": -60}
    gcs_bucket.put("exp/out.parquet.meta/lease.json", orjson.dumps(lease))
    result = cli(*label_args(sim, source, gcs_bucket.uri("exp/out.parquet")), env=gcs_bucket.env)
    assert result.returncode == 0, result.stderr
    assert "took over the lease" in result.stderr and "pid 4242 on node-that-died" in result.stderr
    assert len(gcs_bucket.ids("exp/out.parquet")) == 30
    live = {"host": "busy-node", "pid": 7, "token": "feedbeef", "seconds": 3600}
    gcs_bucket.put("live/out.parquet.meta/lease.json", orjson.dumps(live))
    sim.reset()
    refused = cli(*label_args(sim, source, gcs_bucket.uri("live/out.parquet")), env=gcs_bucket.env)
    assert refused.returncode == 2 and "pid 7 on busy-node" in refused.stderr
    assert sim.stats()["requests"] == 0


def test_gs_credentials_are_never_written_or_printed(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """An access token given as --storage-option reaches no object, local file, progress file or output line."""
    token = "ya29.gcs-secret-7d3e9b1f0a"  # noqa: S105 - a fake, looked for in everything the run leaves
    sim.script([{"kind": "status", "status": 500, "count": -1, "match": "review 2:"}])  # a dead letter, too
    source = write_csv(tmp_path / "in.csv", reviews(40))
    options = ["--storage-option", f"access_token={token}", "--max-retries", "0"]
    result = cli(*label_args(sim, source, gcs_bucket.uri("sec/out.parquet"), *options), env=gcs_bucket.env)
    assert result.returncode == 1, result.stderr  # 1: some rows failed
    assert len(gcs_bucket.ids("sec/out.parquet")) == 39
    keys = gcs_bucket.keys("sec/")
    assert any("/dead/" in k for k in keys) and "sec/out.parquet.meta/progress.json" in keys
    written = [gcs_bucket.get(k) for k in keys] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert "access_token=***" in result.stderr  # the resume hint still names the option
    assert token not in result.stdout + result.stderr
    assert not [blob for blob in written if token.encode() in blob]


def test_missing_gs_bucket_is_a_clear_error(sim: Any, tmp_path: Path, gcs_bucket: GcsBucket) -> None:
    """An output in a gs:// bucket that does not exist fails before any request, naming the bucket and endpoint."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    result = cli(*label_args(sim, source, "gs://no-such-bucket-here/out.parquet"), env=gcs_bucket.env)
    assert result.returncode == 3, result.stderr
    assert "'no-such-bucket-here' does not exist" in result.stderr and gcs_bucket.endpoint in result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0
