"""`labelstream compact` of a sharded dataset in a bucket (moto; the GCS emulator too): one sink, each id once."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from .gcs import gcs_bucket as gcs_bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .gcs import gcs_server as gcs_server  # noqa: PLC0414
from .helpers import cli, kill_at_random_moments, reviews, start_cli, wait_for, write_csv
from .s3 import Bucket, both_stores
from .s3 import bucket as bucket  # noqa: PLC0414
from .s3 import s3_server as s3_server  # noqa: PLC0414
from .test_storage import label_args


def sharded_output(sim: Any, tmp_path: Path, bucket: Bucket, key: str, rows: int) -> tuple[Path, str]:
    """A finished 2-shard dataset at `key` (one row dead-lettered) and its input."""
    source = write_csv(tmp_path / "in.csv", reviews(rows))
    sim.script([{"kind": "label_outside", "count": -1, "match": "review 6:"}])
    result = cli(*label_args(sim, source, bucket.uri(key), "--procs", "2", "--max-retries", "0"), env=bucket.env)
    assert result.returncode == 1, result.stderr
    sim.script([])
    return source, bucket.uri(key)


@both_stores
def test_compact_merges_a_sharded_dataset_in_a_bucket_into_one_sink(sim: Any, tmp_path: Path, bucket: Bucket) -> None:
    """compact turns a bucket dataset (s3://, gs://) of 2 shards into one unsharded sink: ids once, dead letters
    kept, a resume without --shard sends nothing, and no shard side object is left."""
    source, out = sharded_output(sim, tmp_path, bucket, "m/out.parquet", 200)
    result = cli("compact", out, env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert "parts → 1" in result.stdout
    (part,) = bucket.keys("m/out.parquet/")
    assert "part-s" not in part, "a shard's part survived"
    assert sorted(bucket.ids("m/out.parquet")) == sorted(r[0] for r in reviews(200) if r[0] != "r00006")
    assert not [k for k in bucket.keys("m/out.parquet.meta/") if "/shard-" in k or k.endswith(("merging", ".tmp"))]
    report = orjson.loads(cli("status", out, "--json", env=bucket.env).stdout)
    assert report.get("shard_count") in (None, 0, 1) and report["labeled"] == 199
    assert report["failed_unlabeled"] == 1, "the shards' dead letters were lost"
    sim.reset()
    again = cli(*label_args(sim, source, out), env=bucket.env)
    assert again.returncode in (0, 1), again.stderr
    assert sim.stats()["requests"] <= 1  # only the dead-lettered row is retried


@pytest.mark.crash
def test_compact_of_a_sharded_s3_dataset_is_refused_while_a_shard_runs(
    sim: Any, tmp_path: Path, bucket: Bucket
) -> None:
    """While one shard's writer holds its lease, compact refuses, naming that writer, and changes nothing."""
    _, out = sharded_output(sim, tmp_path, bucket, "busy/out.parquet", 60)
    before = bucket.keys("busy/")
    sim.configure(latency_ms=200)
    more = write_csv(tmp_path / "more.csv", reviews(400))
    writer = start_cli(*label_args(sim, more, out, "--shard", "0/2", "--concurrency", "2"), env=bucket.env)
    try:
        lease = "busy/out.parquet.meta/shard-0-of-2/lease.json"
        wait_for(lambda: lease in bucket.keys("busy/"), what="the shard's lease")
        refused = cli("compact", out, env=bucket.env)
        assert writer.poll() is None, "the shard's run ended before compact tried"
    finally:
        writer.kill()
        writer.communicate(timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert f"pid {writer.pid} on {socket.gethostname()}" in refused.stderr
    assert not [k for k in bucket.keys("busy/") if k.endswith("merging")]
    assert {k for k in before if "/out.parquet/" in k} <= set(bucket.keys("busy/")), "a part was removed"


@both_stores
@pytest.mark.crash
def test_kill_9_during_a_sharded_compact_leaves_each_id_at_most_once(sim: Any, tmp_path: Path, bucket: Bucket) -> None:
    """compact of a sharded bucket dataset killed -9 at random moments: readers never see an id twice, runs are
    refused while the merge is half done, and compact again finishes it with every id once."""
    _, out = sharded_output(sim, tmp_path, bucket, "k/out.parquet", 3000)
    wanted = sorted(r[0] for r in reviews(3000) if r[0] != "r00006")

    def at_most_once() -> None:
        seen = bucket.ids("k/out.parquet")
        assert len(seen) == len(set(seen)), "an id is in the dataset twice"

    # Parts of 20 rows: many staged parts, deletes and copies (a second or two), so that kills land inside the
    # journal too; once the merge is done, a further compaction rewrites the merged parts, killed the same way.
    compacting = ("compact", out, "--rows-per-part", "20")
    kills = kill_at_random_moments(
        lambda: start_cli(*compacting, env=bucket.env), random.Random(f"kill-compact-{out[:2]}"), between=(0.2, 0.8),
        check=at_most_once, most=4,
    )  # fmt: skip
    assert kills >= 1, "no kill landed mid-compaction: nothing was tested"
    if [k for k in bucket.keys("k/out.parquet.meta/") if k.endswith("merging")]:
        refused = cli(*label_args(sim, tmp_path / "in.csv", out), env=bucket.env)
        assert refused.returncode == 2 and "labelstream compact" in refused.stderr
    result = cli(*compacting, env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert sorted(bucket.ids("k/out.parquet")) == wanted
    assert not [k for k in bucket.keys("k/") if "/shard-" in k or k.endswith(("merging", ".tmp", "drop.json"))]


def test_compact_finishes_a_compaction_killed_after_deleting_every_old_part(
    sim: Any, tmp_path: Path, bucket: Bucket
) -> None:
    """A compaction killed between its deletes and its copies (no part left, the new one staged) is finished by
    the next compact, not refused as empty: every id is back, once."""
    rows = reviews(60)
    out = bucket.uri("gone/out.parquet")
    assert cli(*label_args(sim, write_csv(tmp_path / "in.csv", rows), out, "--checkpoint-every", "1000"),
               env=bucket.env).returncode == 0  # fmt: skip
    (part,) = bucket.keys("gone/out.parquet/")
    staged = "part-000001-0badc0de.parquet"
    bucket.client.copy_object(Bucket=bucket.name, Key=f"gone/out.parquet.meta/tmp/{staged}.tmp",
                              CopySource=f"{bucket.name}/{part}")  # fmt: skip
    plan = {"remove": [part.rsplit("/", 1)[1]], "publish": [staged]}
    bucket.put("gone/out.parquet.meta/drop.json", orjson.dumps(plan))
    bucket.client.delete_object(Bucket=bucket.name, Key=part)
    result = cli("compact", out, env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert sorted(bucket.ids("gone/out.parquet")) == sorted(r[0] for r in rows)
    assert not [k for k in bucket.keys("gone/") if k.endswith((".tmp", "drop.json"))]
