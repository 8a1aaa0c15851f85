"""The batch and Ray engines into s3:// (moto's S3 server on loopback, the simulator's Batch API): the batch
record on the bucket, no row sent twice after kill -9, Ray parts staged under `.meta/` and committed once."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from .helpers import cli, reviews, start_cli, wait_for, write_csv
from .s3 import Bucket
from .s3 import bucket as bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .s3 import s3_server as s3_server  # noqa: PLC0414


def label_args(sim: Any, source: Path, output: str, *extra: str) -> list[str]:
    return [
        "label", "--input", str(source), "--output", output, "--base-url", sim.base_url, "--no-progress",
        "--checkpoint-every", "25", "--checkpoint-seconds", "0.2", *extra,
    ]  # fmt: skip


def bucket_ledger(bucket: Bucket, key: str) -> dict[str, Any]:
    """The batch engine's record on the bucket ({} before the first batch run)."""
    try:
        body = bucket.client.get_object(Bucket=bucket.name, Key=f"{key}.meta/batches.json")["Body"].read()
    except bucket.client.exceptions.NoSuchKey:
        return {}
    return dict(orjson.loads(body))


def states(bucket: Bucket, key: str) -> list[str]:
    return [s["state"] for s in bucket_ledger(bucket, key).get("submissions", [])]


@pytest.mark.crash
def test_batch_engine_into_s3_survives_kill_9_after_submit(sim: Any, tmp_path: Path, bucket: Bucket) -> None:
    """--engine batch into s3:// keeps its record and rows files on the bucket: killed once batches are at the
    provider, `batch status` reads them from the bucket and the resumed run collects them, no row sent twice."""
    sim.configure(batch_seconds=3600)
    rows = reviews(120)
    wanted = sorted(r[0] for r in rows)
    source = write_csv(tmp_path / "in.csv", rows)
    key = "batch/out.parquet"
    args = label_args(
        sim, source, bucket.uri(key), "--engine", "batch", "--poll-interval", "0.05", "--batch-size", "40"
    )
    proc = start_cli(*args, env=bucket.env)
    try:
        wait_for(lambda: proc.poll() is not None or states(bucket, key) == ["submitted"] * 3, timeout=60,
                 what="three batches at the provider")  # fmt: skip
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    rows_files = [k for k in bucket.keys(f"{key}.meta/batches/") if k.endswith(".rows.jsonl")]
    assert len(rows_files) == 3, "each submission's rows file is kept on the bucket"
    status = cli("batch", "status", bucket.uri(key), "--base-url", sim.base_url, env=bucket.env)
    assert status.returncode == 0, status.stderr
    assert "3 batches, 3 not yet collected (120 rows)" in status.stdout
    sim.configure(batch_seconds=0)
    result = cli(*args, env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert sorted(bucket.ids(key)) == wanted
    assert Counter(sim.batch_summary()["submissions"]) == Counter(wanted), "a row went to the Batch API twice"
    assert states(bucket, key) == ["collected"] * 3
    assert bucket.keys(f"{key}.meta/batches/") == [], "collected batches leave no files on the bucket"
    assert f"{key}.meta/lease.json" not in bucket.keys(f"{key}.meta/")
