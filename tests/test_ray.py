"""labelstream inside Ray Data, on a local Ray instance against the simulator: exactly once, resume after a
kill, one rate limit for all actors, and an output the other commands read."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest

from pipeline.engines.ray.limit import SharedLimit
from pipeline.ratelimit.limiter import REQUEST_BURST, SAFETY
from pipeline.sinks import SinkMeta
from pipeline.sinks.limit_memory import LimitMemory, endpoint_name
from pipeline.sinks.progress_file import SCHEMA, read_progress

from .helpers import ROOT, SENTIMENT, TEST_KEY, cli, cli_env, dead_letters, reviews, wait_for, write_csv

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make test installs it)")

from pipeline.ray import label_dataset, write_labels  # noqa: E402 - needs ray, checked just above


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray instance for the library tests of this module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: Ray puts Unix sockets under its temp dir, and their paths are limited to 107."""
    path = Path(tempfile.mkdtemp(prefix="lsray"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def parquet_ids(path: Path) -> list[str]:
    """Every id in a Parquet dataset directory, as pandas/duckdb/polars would read it."""
    ids: list[str] = pads.dataset(path, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    return ids


def test_the_shared_schedule_spaces_requests_and_tokens_for_every_caller() -> None:
    """Reservations from any number of callers follow one RPM and one TPM schedule; a 429 pushes all later."""
    now = [100.0]
    limit = SharedLimit(rpm=600, tpm=None, clock=lambda: now[0])
    waits = [limit.reserve(10) for _ in range(30)]  # 30 callers at the same instant
    interval = 60 / (600 * SAFETY)
    assert waits[0] == 0.0
    assert waits[-1] == pytest.approx(29 * interval - 0.1, abs=interval)  # 0.1 s: the burst allowance
    sent = sorted(now[0] + w for w in waits)
    assert all(b - a <= interval + 1e-9 for a, b in itertools.pairwise(sent))
    limit.pause(5.0)
    assert limit.reserve(10) >= 5.0
    tokens = SharedLimit(rpm=None, tpm=60_000, clock=lambda: now[0])
    first, second = tokens.reserve(2000), tokens.reserve(2000)
    assert first == 0.0 and second == pytest.approx(2000 * 60 / (60_000 * SAFETY) - 1.0)
    tokens.settle(2000, 200)  # the first reply showed 200 tokens: the schedule gives the rest back
    assert tokens.reserve(10) == pytest.approx((2000 + 200) * 60 / (60_000 * SAFETY) - 1.0)


def test_the_shared_schedule_starts_at_remembered_limits_and_headers_override_them() -> None:
    """Limits an earlier run learned pace the job from its first reservation (an RPM, or a rate its 429s taught);
    limits given or announced win over them; what the job learns (announced, the actors' rates summed) is kept."""
    now = [100.0]
    remembered = SharedLimit(rpm=None, tpm=None, remembered={"rpm": 600, "rate": 4.0}, clock=lambda: now[0])
    assert (remembered.rpm, remembered.learned()) == (600, None), "nothing learned: nothing to keep"
    remembered.learn(1200, None)  # the provider now says 1,200 (a new tier)
    assert remembered.rpm == 1200
    remembered.learned_rate("actor-1", 3.0)
    remembered.learned_rate("actor-2", 4.0)
    assert remembered.learned() == {"rpm": 1200, "tpm": None, "rate": 7.0, "window": None}
    silent = SharedLimit(rpm=None, tpm=None, remembered={"rate": 10.0}, clock=lambda: now[0])
    waits = [silent.reserve(10) for _ in range(11)]
    assert waits[-1] == pytest.approx(1.0 - REQUEST_BURST), "paced at the remembered 10 requests/s"
    given = SharedLimit(rpm=300, tpm=None, remembered={"rpm": 600, "tpm": 90_000}, clock=lambda: now[0])
    assert (given.rpm, given.tpm) == (300, 90_000)


@pytest.mark.ray
def test_label_dataset_labels_each_row_once_and_the_output_reads_as_a_sink(
    sim: Any, local_ray: Any, tmp_path: Path
) -> None:
    """A Ray dataset in, a labelstream Parquet sink out: every good row once, failures as dead letters, and
    `status`/`export` read the directory; a second run with skip_done sends nothing."""
    sim.configure(latency_ms=20)
    sim.script([{"kind": "status", "status": 400, "match": "리뷰 7:", "count": 10}])
    items = [{"id": i, "lang": lang, "text": text} for i, lang, text in reviews(400)]
    items.append({"id": "blank", "lang": "en", "text": "   "})
    out = tmp_path / "labels.parquet"
    letters = tmp_path / "labels.parquet.meta" / "dead_letters.jsonl"
    labeled = label_dataset(
        local_ray.data.from_items(items, override_num_blocks=8),
        SENTIMENT,
        base_url=sim.base_url,
        concurrency=32,
        actors=2,
        dead_letters=letters,
    )
    write_labels(labeled, out, rows_per_file=100)
    ids = parquet_ids(out)
    assert len(ids) == len(set(ids)) == 399
    assert set(ids) == {i["id"] for i in items} - {"r00007", "blank"}
    assert sorted((d["id"], d["kind"]) for d in dead_letters(out)) == [
        ("blank", "empty_text"),
        ("r00007", "bad_request"),
    ]
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in out.iterdir())
    assert not list((tmp_path / "labels.parquet.meta" / "tmp").glob("*"))
    status = cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert "399 labeled, 2 failed and not yet labeled" in status.stdout
    gold = write_csv(tmp_path / "gold.csv", [(i, "positive") for i in sorted(ids)], header=("id", "gold"))
    evaluated = cli("eval", str(out), "--gold", str(gold), "--gold-column", "gold")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "399" in evaluated.stdout
    sim.reset()
    again = label_dataset(local_ray.data.from_items(items), SENTIMENT, base_url=sim.base_url, skip_done=out)
    write_labels(again, out)
    assert sim.stats(events=False)["requests"] == 1, "only the row that failed at the API is sent again"


@pytest.mark.ray
@pytest.mark.wallclock
def test_two_actors_share_one_600_rpm_limit(sim: Any, local_ray: Any, tmp_path: Path) -> None:
    """Two actors, each able to send far more, stay under the key's 600 RPM together (the simulator enforces it
    per second, as OpenAI does, and says nothing in headers): almost no 429s, at close to the limit."""
    sim.configure(latency_ms=20, rpm=600, rate_headers="none")
    items = [{"id": i, "lang": lang, "text": text} for i, lang, text in reviews(150)]
    labeled = label_dataset(
        local_ray.data.from_items(items, override_num_blocks=6),
        SENTIMENT,
        base_url=sim.base_url,
        concurrency=40,
        rpm=600,
        actors=2,
    )
    write_labels(labeled, tmp_path / "out.parquet")
    stats = sim.stats()
    assert len(set(parquet_ids(tmp_path / "out.parquet"))) == 150
    refused = stats["by_status"].get("429", 0)
    assert refused <= 0.03 * stats["requests"], f"{refused} of {stats['requests']} requests refused"
    times = sorted(t for t, _, _ in stats["events"])
    per_second = (len(times) - 1) / (times[-1] - times[0])
    assert per_second <= 10.5, f"{per_second:.1f} requests/s against a limit of 10"
    assert per_second >= 0.8 * 10 * SAFETY, f"only {per_second:.1f} requests/s"


@pytest.mark.ray
def test_engine_ray_starts_at_the_limits_a_run_remembered_and_keeps_what_it_learns(
    sim: Any, tmp_path: Path, short_tmp: Path
) -> None:
    """`label --engine ray` reads and keeps the sink's remembered limits as the online run does: the remembered RPM
    reaches the shared schedule and stays in the record, beside the rate the actors' 429s teach them against a
    silent provider (the schedule's pacing from recalled figures: test_the_shared_schedule_starts_at_remembered...)."""
    sim.configure(latency_ms=20, rpm=600, rate_headers="none")
    # 60 rows: the remembered 1200 RPM meets the 600 the simulator allows within the first second, where the 429s
    # that teach the rate come; more rows only add seconds paced at 10/s.
    source = write_csv(tmp_path / "in.csv", reviews(60))
    out = tmp_path / "out.parquet"
    meta = SinkMeta(out)
    meta.ensure()
    hour_ago = time.time() - 3600
    LimitMemory(meta.limits_path, meta.write_json_atomic, endpoint=endpoint_name(sim.base_url), model="gpt-4o-mini",
                clock=lambda: hour_ago).keep({"rpm": 1200})  # fmt: skip
    result = cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--engine", "ray",
                 "--concurrency", "40", "--ray-actors", "2", "--quiet", env={"RAY_TMPDIR": str(short_tmp)},
                 timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    kept = json.loads(meta.limits_path.read_text())
    assert kept["rpm"] == 1200 and kept.get("rate", 0) > 0 and kept["saved_at"] > hour_ago + 60, kept


@pytest.mark.ray
@pytest.mark.crash
def test_engine_ray_resumes_after_kill_9_with_each_row_once(sim: Any, tmp_path: Path, short_tmp: Path) -> None:
    """`label --engine ray` killed (the whole process group, Ray with it) once a part is written; the same
    command finishes the job: every id once, and only rows of unwritten parts are paid for again."""
    sim.configure(latency_ms=50)  # 4 in flight: about 80 rows/s, so the first of six parts comes well before the end
    rows = reviews(1200)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    args = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--engine", "ray",
            "--concurrency", "4", "--checkpoint-every", "200", "--quiet"]  # fmt: skip
    env = cli_env({"RAY_TMPDIR": str(short_tmp)})
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], stdout=log, stderr=log, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            wait_for(lambda: out.is_dir() and any(out.iterdir()), timeout=90, what="a first written part")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as when a machine dies
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first = parquet_ids(out)
    assert first and len(first) == len(set(first)) and len(first) < len(rows)
    paid_first = sim.stats(events=False)["completed_ok"]  # replies the killed run received
    faster = [*args[: args.index("--concurrency")], "--concurrency", "32", *args[args.index("--concurrency") + 2 :]]
    result = cli(*faster, env={"RAY_TMPDIR": str(short_tmp)}, timeout=240)
    assert result.returncode == 0, result.stderr
    ids = parquet_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows), "every row exactly once"
    exported = cli("export", str(out), "--input", str(source), "--to", str(tmp_path / "labeled.csv"))
    assert exported.returncode == 0, exported.stderr
    assert len((tmp_path / "labeled.csv").read_text(encoding="utf-8").splitlines()) == len(rows) + 1
    repaid = sim.stats(events=False)["completed_ok"] - len(rows)  # replies of both runs beyond one per row
    assert 0 <= repaid < paid_first, f"{repaid} replies paid twice"
    logs = [p for p in short_tmp.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".json")]
    assert logs, "Ray wrote no logs where expected"
    assert not [p for p in logs if TEST_KEY.encode() in p.read_bytes()], "the API key leaked into Ray's files"


@pytest.mark.ray
def test_engine_ray_writes_the_same_progress_file_as_the_other_engines(
    sim: Any, tmp_path: Path, short_tmp: Path
) -> None:
    """`label --engine ray` ends with a versioned progress file carrying its state and summary, as online runs do."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.parquet"
    result = cli(
        "label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--engine", "ray",
        "--quiet", env={"RAY_TMPDIR": str(short_tmp)}, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = read_progress(SinkMeta(out).progress_path)
    assert doc is not None and doc["schema"] == SCHEMA and doc["state"] == "done" and doc["engine"] == "ray"
    assert doc["summary"]["labeled"] == 30
