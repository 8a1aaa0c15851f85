"""The batch and Ray engines into s3:// (moto's S3 server on loopback, the simulator's Batch API): the batch
record on the bucket, no row sent twice after kill -9, Ray parts staged under `.meta/` and committed once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .gcs import gcs_bucket as gcs_bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .gcs import gcs_server as gcs_server  # noqa: PLC0414
from .helpers import ROOT, cli, cli_env, reviews, start_cli, wait_for, write_csv
from .s3 import Bucket, both_stores
from .s3 import bucket as bucket  # noqa: PLC0414
from .s3 import s3_server as s3_server  # noqa: PLC0414


def label_args(sim: Any, source: Path, output: str, *extra: str) -> list[str]:
    return [
        "label", "--input", str(source), "--output", output, "--base-url", sim.base_url, "--no-progress",
        "--checkpoint-every", "25", "--checkpoint-seconds", "0.2", *extra,
    ]  # fmt: skip


def bucket_ledger(bucket: Bucket, key: str) -> dict[str, Any]:
    """The batch engine's record on the bucket ({} before the first batch run)."""
    try:
        with bucket.fs.open_input_stream(f"{bucket.name}/{key}.meta/batches.json") as stream:
            body = stream.read()
    except FileNotFoundError:
        return {}
    try:
        return dict(orjson.loads(body))
    except orjson.JSONDecodeError:  # read while the run rewrote it (pyarrow's GCS reads are not pinned to a version)
        return {}


def states(bucket: Bucket, key: str) -> list[str]:
    return [s["state"] for s in bucket_ledger(bucket, key).get("submissions", [])]


@both_stores
@pytest.mark.crash
def test_batch_engine_into_s3_survives_kill_9_after_submit(sim: Any, tmp_path: Path, bucket: Bucket) -> None:
    """--engine batch into s3:// (and gs://) keeps its record and rows files on the bucket: killed once batches are
    at the provider, `batch status` reads them from the bucket and the resumed run collects them, none sent twice."""
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


def stage_part(bucket: Bucket, key: str, run: str, table: pa.Table) -> None:
    """Leave a part in a run's staging prefix, as a Ray write task of that run would (also after its driver died)."""
    pq.write_table(
        table, f"{bucket.name}/{key}.meta/staging/{run}/part-000000-{'ab' * 16}0.parquet", filesystem=bucket.fs
    )


def test_parts_staged_by_a_dead_ray_run_are_committed_once_with_repeated_ids_dropped(
    sim: Any, tmp_path: Path, bucket: Bucket
) -> None:
    """A part that lands in a dead Ray run's staging prefix after later runs labeled some of its rows is committed by
    the next run without those rows: the new rows are not sent again, and every id is in the dataset once."""
    rows = reviews(70)
    source = write_csv(tmp_path / "in.csv", rows)
    key = "late/out.parquet"
    first = cli(*label_args(sim, source, bucket.uri(key), "--limit", "60"), env=bucket.env)
    assert first.returncode == 0, first.stderr
    labeled = pq.read_table(f"{bucket.name}/{key}", filesystem=bucket.fs)
    missing = sorted({r[0] for r in rows} - set(labeled.column("id").to_pylist()))
    late = labeled.slice(0, 30)  # 20 rows the dataset holds, and 10 it lacks
    ids = late.column("id").to_pylist()[:20] + missing
    stage_part(bucket, key, "run-that-died", late.set_column(0, "id", pa.array(ids, pa.string())))
    sim.reset()
    result = cli(*label_args(sim, source, bucket.uri(key)), env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert "committed 10 rows an earlier --engine ray run had staged (20 rows already" in result.stderr
    assert sim.stats(events=False)["requests"] == 0, "rows a staged part held were sent again"
    assert sorted(bucket.ids(key)) == sorted(r[0] for r in rows)
    assert bucket.keys(f"{key}.meta/staging/") == []


def test_only_the_lease_holder_commits_staged_parts(
    sim: Any, tmp_path: Path, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink opened without the lease (status, a dry run, a library reader) cannot commit a Ray run's staged
    parts: beside a live Ray run that could save its rows twice. The staged part stays for the lease holder."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    key = "reader/out.parquet"
    first = cli(*label_args(sim, source, bucket.uri(key), "--limit", "5"), env=bucket.env)
    assert first.returncode == 0, first.stderr
    stage_part(bucket, key, "live-ray-run", pq.read_table(f"{bucket.name}/{key}", filesystem=bucket.fs))
    for name, value in bucket.env.items():
        monkeypatch.setenv(name, value)
    from pipeline.errors import SinkError  # noqa: PLC0415 - the store's client loads with the sink
    from pipeline.input.ids import IdSet  # noqa: PLC0415
    from pipeline.sinks import open_sink  # noqa: PLC0415
    from pipeline.sinks.objects import ObjectParquetSink  # noqa: PLC0415

    sink = open_sink(bucket.uri(key))
    assert isinstance(sink, ObjectParquetSink)
    with pytest.raises(SinkError, match="only by the run that holds the lease"):
        sink.commit_staged(IdSet())
    assert len(bucket.keys(f"{key}.meta/staging/")) == 1


def ray_args(sim: Any, source: Path, output: str, *extra: str) -> list[str]:
    return [
        "label", "--input", str(source), "--output", output, "--base-url", sim.base_url, "--engine", "ray",
        "--ray-actors", "2", "--checkpoint-every", "100", "--checkpoint-seconds", "0.5", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: Ray puts Unix sockets under its temp dir, and their paths are limited to 107."""
    path = Path(tempfile.mkdtemp(prefix="lsray"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of this user's processes whose environment has `name=value` (Linux /proc)."""
    wanted, found = f"{name}={value}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or another user's
                continue
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_engine_ray_into_s3_writes_through_staging_each_row_once(
    sim: Any, tmp_path: Path, bucket: Bucket, short_tmp: Path
) -> None:
    """`--engine ray` into s3:// (refused before): every good row once in the dataset, its parts committed from the
    staging prefix (left empty), the actors' dead letters on the bucket, and `status` reads it all."""
    pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")
    sim.script([{"kind": "status", "status": 400, "match": "리뷰 7:", "count": 10}])
    rows = reviews(300)
    source = write_csv(tmp_path / "in.csv", rows)
    key = "ray/out.parquet"
    env = {**bucket.env, "RAY_TMPDIR": str(short_tmp)}
    result = cli(*ray_args(sim, source, bucket.uri(key)), env=env, timeout=240)
    assert result.returncode == 1, result.stderr  # one row dead-lettered
    ids = bucket.ids(key)
    assert len(ids) == len(set(ids)) == 299 and "r00007" not in ids
    assert bucket.keys(f"{key}.meta/staging/") == []
    assert [k for k in bucket.keys(f"{key}.meta/dead/") if k.endswith(".jsonl")]
    status = cli("status", bucket.uri(key), env=bucket.env)
    assert status.returncode == 0, status.stderr
    assert "299 labeled, 1 failed and not yet labeled" in status.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.crash
def test_engine_ray_into_s3_resumes_after_kill_9_with_each_row_once(
    sim: Any, tmp_path: Path, bucket: Bucket, short_tmp: Path
) -> None:
    """`--engine ray` into s3:// killed (driver and Ray) once a part is staged or committed: readers never see an id
    twice, and the same command commits what the dead run staged and labels the rest: every id once."""
    pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")
    sim.configure(latency_ms=50)
    rows = reviews(1000)
    source = write_csv(tmp_path / "in.csv", rows)
    key = "rayk/out.parquet"
    args = ray_args(sim, source, bucket.uri(key), "--concurrency", "4")
    env = cli_env({**bucket.env, "RAY_TMPDIR": str(short_tmp)})
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=log, stderr=log, cwd=ROOT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            wait_for(lambda: proc.poll() is not None or any(k.endswith(".parquet") for k in bucket.keys("rayk/")),
                     timeout=120, what="a first staged or committed part")  # fmt: skip
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as when a machine dies
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    # Ray's workers are not in the driver's process group: one that was writing may PUT its part after the kill.
    # Wait for them to end, so that no part lands after the second run's last commit (one that lands during the
    # run is committed by it: test_a_ray_job_that_ends_during_a_commit_gets_one_more_commit).
    wait_for(lambda: not processes_with_env("RAY_TMPDIR", str(short_tmp)), timeout=60, what="the killed run's Ray")
    first = bucket.ids(key)
    assert len(first) == len(set(first)) < len(rows)
    result = cli(*ray_args(sim, source, bucket.uri(key), "--concurrency", "32"), env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    assert sorted(bucket.ids(key)) == sorted(r[0] for r in rows), "every row exactly once"
    assert bucket.keys(f"{key}.meta/staging/") == []


def test_engine_ray_into_s3_refuses_credentials_given_as_storage_options(
    sim: Any, tmp_path: Path, bucket: Bucket
) -> None:
    """--engine ray into s3:// with --storage-option secret_key=… is refused (exit 2) before a request, a lease or a
    part, naming the environment instead: Ray would keep the secret among its task arguments."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    extra = ("--engine", "ray", "--storage-option", "secret_key=do-not-keep-me")
    result = cli(*label_args(sim, source, bucket.uri("ray/out.parquet"), *extra), env=bucket.env)
    assert result.returncode == 2, result.stderr
    assert "--storage-option secret_key" in result.stderr and "environment" in result.stderr
    assert "do-not-keep-me" not in result.stderr
    assert sim.stats()["requests"] == 0
    assert bucket.keys("ray/") == []


def test_a_ray_job_that_ends_during_a_commit_gets_one_more_commit() -> None:
    """The job's last parts can land while a periodic commit is running: the run commits once more after it sees the
    job end, so a run that exits 0 never leaves rows in staging (where readers do not look)."""
    import asyncio  # noqa: PLC0415
    import threading  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from pipeline.engines.ray.engine import RayEngine  # noqa: PLC0415 - imports no Ray until a job runs

    commit_started, job_ended = threading.Event(), threading.Event()
    commits: list[bool] = []  # for each commit: whether the job had ended when it began
    runs: list[str | None] = []  # for each commit: the run whose staging it took (None: every run's)

    class Sink:
        def commit_staged(self, done: Any, run_id: str | None = None) -> tuple[int, int]:
            commits.append(job_ended.is_set())
            runs.append(run_id)
            commit_started.set()
            if len(commits) == 1:
                assert job_ended.wait(30), "the job did not end"  # the job writes its last part during this commit
            return 0, 0

    class Engine(RayEngine):
        def _label(self, run: Any, refs: list[Any]) -> None:
            assert commit_started.wait(30), "no commit started while the job ran"
            job_ended.set()

    run = SimpleNamespace(opts=SimpleNamespace(checkpoint=SimpleNamespace(seconds=0.01)), prepared=SimpleNamespace(
        done=None), run_id="r1")  # fmt: skip
    asyncio.run(Engine()._label_and_commit(run, [], Sink()))  # type: ignore[arg-type]
    assert commits[0] is False and commits[-1] is True, commits
    # Periodic commits take this run's parts; the last takes every run's, so a part a dead run's write task PUT
    # after this run started (its Ray outlives a kill -9 of the driver) is not left in staging.
    assert runs[0] == "r1" and runs[-1] is None, runs
