"""Outputs on gs:// against fake-gcs-server on loopback: what differs from s3:// (the guarantees both stores share,
resume, kill -9, two writers, expired and live leases, a missing bucket, run on both from test_storage.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.sinks.storage import ObjectStore

from .gcs import GcsBucket
from .gcs import gcs_bucket as gcs_bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .gcs import gcs_server as gcs_server  # noqa: PLC0414
from .helpers import cli, reviews, write_csv
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
