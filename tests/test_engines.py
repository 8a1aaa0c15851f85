"""Every guarantee of a run, for every engine: the same test over online, batch and (when installed) Ray.

The run around the requests is one (`pipeline.run.lifecycle.Run`); these tests prove that each engine that
plugs into it keeps what the run promises: exactly once after kill -9, an id repeated in the input labeled
once, dead letters sent again by the next run, the resume guard, and --max-cost stopping with exit 4 under
the cap.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.pricing import cost_of
from pipeline.engines import run_engine
from pipeline.engines.batch.settings import BatchSettings
from pipeline.errors import FatalApiError, OverBudget, SinkMismatchError
from pipeline.ratelimit.limiter import LimitSettings
from pipeline.run.options import RunOptions
from pipeline.run.summary import Summary
from pipeline.sinks import open_sink
from pipeline.task.config import TaskConfig, load_config

from .helpers import FAST_RETRY, ROOT, SENTIMENT, cli_env, dead_letters, reviews, sink_ids, wait_for, write_csv
from .test_budget import estimated_cost, reasoning_task
from .test_dedupe import repeated_rows

HAS_RAY = importlib.util.find_spec("ray") is not None
NEEDS_RAY = pytest.mark.skipif(not HAS_RAY, reason="no ray extra")
ENGINES = ["online", "batch", pytest.param("ray", marks=[NEEDS_RAY, pytest.mark.ray])]
WITH_AUTO = [*ENGINES, "auto"]
FLAGS = {
    "online": [],
    "batch": ["--poll-interval", "0.05", "--batch-size", "50"],
    "auto": ["--poll-interval", "0.05", "--online-rows", "40", "--batch-size", "50"],
    "ray": ["--ray-actors", "1"],
}
TIER = {"online": "standard", "batch": "batch", "ray": "standard"}


@pytest.fixture(scope="module")
def ray_here() -> Iterator[None]:
    """One local Ray for the in-process Ray runs of this module (the engine leaves a Ray it did not start)."""
    if not HAS_RAY:
        yield
        return
    import ray  # noqa: PLC0415 - the ray extra is optional

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder for Ray's files: it puts Unix sockets there, and their paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="lseng", ignore_cleanup_errors=True) as path:
        yield Path(path)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test in this process (a local Ray is started for `ray`)."""
    name: str = request.param
    if name == "ray":
        request.getfixturevalue("ray_here")
    return name


def run(
    engine: str,
    sim: Any,
    source: Path,
    out: Path,
    *,
    config: TaskConfig = SENTIMENT,
    online_rows: int = 100,
    **options: Any,
) -> Summary:
    """One run of `engine` in this process against the simulator (`online_rows`: auto's online slice)."""
    opts = RunOptions.build(
        source,
        out,
        config,
        limits=LimitSettings(concurrency=8),
        retry=FAST_RETRY,
        base_url=sim.base_url,
        api_key="sk-test-key",
        progress="off",
        **options,
    )
    batch = BatchSettings(poll_seconds=0.02, online_rows=online_rows)
    return asyncio.run(run_engine(engine, opts, batch=batch, actors=1, notice=io.StringIO()))


# Not indirect: the processes start their own Ray (two Ray starts make the ray case slow).
@pytest.mark.crash
@pytest.mark.parametrize(
    "engine", ["online", "batch", "auto", pytest.param("ray", marks=[NEEDS_RAY, pytest.mark.ray, pytest.mark.slow])]
)
def test_kill_9_then_the_same_command_labels_each_id_exactly_once(
    engine: str, sim: Any, tmp_path: Path, short_tmp: Path
) -> None:
    """kill -9 (the process group: Ray with it) once part of the work is saved, when originals may be saved and
    their copies not yet; the same command then completes the sink with every id exactly once, the rows that
    repeat a text as copies (every engine dedupes)."""
    # Ray starts its actors, then labels 4 rows at a time: 50 ms replies (80 rows/s) let a kill land mid-job.
    sim.configure(latency_ms=50 if engine == "ray" else 20)
    rows = repeated_rows(800 if engine == "ray" else 400)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    args = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--engine", engine,
            "--concurrency", "4", "--checkpoint-every", "50", "--checkpoint-seconds", "0.2", "--quiet",
            *FLAGS[engine]]  # fmt: skip
    if engine in ("batch", "auto"):
        sim.configure(batch_seconds=0.5)  # batches of 50 rows end one after another
    env = cli_env({"RAY_TMPDIR": str(short_tmp)})
    command = [sys.executable, "-m", "pipeline", *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: out.is_dir() and any(out.glob("*.parquet")), timeout=90, what="a first saved part")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first = sink_ids(out)
    assert first and len(first) == len(set(first)) and len(first) < len(rows)
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert again.returncode == 0, again.stderr
    assert check_copies(out, rows) > 0  # also: every id exactly once


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_an_id_repeated_in_the_input_is_labeled_once(engine: str, sim: Any, tmp_path: Path) -> None:
    """The same id twice (same text, and again with other text) is labeled once, by its first row."""
    rows = reviews(40)
    source = write_csv(tmp_path / "in.csv", [*rows, rows[3], (rows[5][0], "en", "other text, same id")])
    out = tmp_path / "out.parquet"
    summary = run(engine, sim, source, out)
    ids = sink_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows)
    assert summary.labeled == len(rows)
    if engine != "ray":  # Ray's sink records come from its writer: the input text is not carried
        assert summary.duplicates == 1 and summary.conflicts == 1


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_dead_letters_are_sent_again_by_the_next_run(engine: str, sim: Any, tmp_path: Path) -> None:
    """A row that fails every attempt becomes a dead letter (exit 1); the next run sends it again and labels it."""
    rows = reviews(30)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    attempts = 1 if engine == "batch" else FAST_RETRY.max_attempts  # a batch sends each request once
    sim.script([{"kind": "status", "status": 500, "match": "review 4: fine", "count": attempts}])
    first = run(engine, sim, source, out)
    assert first.failed == 1 and first.exit_code == 1
    assert [d["id"] for d in dead_letters(out)] == ["r00004"]
    assert "r00004" not in sink_ids(out)
    second = run(engine, sim, source, out)
    assert second.labeled == 1 and second.exit_code == 0
    ids = sink_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_a_sink_made_with_another_prompt_is_refused_before_any_request(engine: str, sim: Any, tmp_path: Path) -> None:
    """Resuming with changed instructions is refused before anything is sent, and the sink is left as it was."""
    rows = reviews(20)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    run(engine, sim, source, out, max_rows=10)
    before = sim.stats(events=False)["requests"]
    other = tmp_path / "other.toml"
    other.write_text(
        (ROOT / "configs" / "sentiment.toml").read_text(encoding="utf-8").replace("You label", "You classify", 1),
        encoding="utf-8",
    )
    assert load_config(other).prompt_fingerprint() != SENTIMENT.prompt_fingerprint()
    with pytest.raises(SinkMismatchError, match="--force"):
        run(engine, sim, source, out, config=load_config(other))
    assert sim.stats(events=False)["requests"] == before
    assert len(sink_ids(out)) == 10


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_max_cost_stops_with_exit_4_and_the_spend_under_the_cap(engine: str, sim: Any, tmp_path: Path) -> None:
    """Replies dearer than estimated (hidden reasoning tokens): the run stops before passing --max-cost, with
    exit 4, what it labeled saved, and what the saved rows cost within the cap."""
    rows = reviews(120)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    config = reasoning_task(tmp_path)
    sim.configure(reasoning_tokens=150)
    cap = round(estimated_cost(source, out, config) * 1.2, 6)
    with pytest.raises(OverBudget) as stopped:
        run(engine, sim, source, out, config=load_config(config), max_cost=cap)
    assert stopped.value.exit_code == 4
    saved = sink_ids(out)
    assert 0 < len(saved) < len(rows) and len(saved) == len(set(saved))
    assert spent(out, TIER[engine]) <= cap


def test_auto_keeps_one_max_cost_across_its_online_slice_and_its_batches(sim: Any, tmp_path: Path) -> None:
    """--engine auto is two runs of one sink (a slice online, the rest as batches): the batches get what the
    slice left of --max-cost, so the whole run, the slice at standard prices and the batches at batch prices,
    stays under the cap."""
    rows = reviews(120)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    config = reasoning_task(tmp_path)
    sim.configure(reasoning_tokens=150, batch_seconds=0)
    cap = round(estimated_cost(source, out, config) * 1.0, 6)
    opts = RunOptions.build(
        source, out, load_config(config), limits=LimitSettings(concurrency=8), retry=FAST_RETRY,
        base_url=sim.base_url, api_key="sk-test-key", progress="off", max_cost=cap,
    )  # fmt: skip
    batch = BatchSettings(poll_seconds=0.02, online_rows=30)
    with pytest.raises(OverBudget):
        asyncio.run(run_engine("auto", opts, batch=batch, notice=io.StringIO()))
    online = {r[0] for r in rows[:30]}
    records = list(open_sink(out).iter_records())
    assert online <= {r["id"] for r in records} and len(records) < len(rows), "the slice ran, the batches stopped"
    total = sum(
        cost_of(
            r["model"], r["prompt_tokens"], r["completion_tokens"], tier="standard" if r["id"] in online else "batch"
        )
        or 0.0
        for r in records
    )
    assert total <= cap, (len(records), total, cap)


def requests_sent(sim: Any) -> int:
    """Requests the simulator took, online and in batches."""
    return int(sim.stats(events=False)["requests"]) + sum(Counter(sim.batch_summary()["submissions"]).values())


def check_copies(output: Path, rows: list[tuple[str, str, str]]) -> int:
    """Every id has one record; each copy names a record of its own text that was sent (not a copy) and has its
    label; returns how many copies there are."""
    records = {r["id"]: r for r in open_sink(output).iter_records()}
    assert sorted(sink_ids(output)) == sorted(r[0] for r in rows)
    texts = {rid: text for rid, _, text in rows}
    copies = [r for r in records.values() if r["copied_from"] is not None]
    for copy in copies:
        original = records[copy["copied_from"]]
        assert original["copied_from"] is None and original["label"] == copy["label"]
        assert texts[original["id"]] == texts[copy["id"]] and copy["prompt_tokens"] == 0
    return len(copies)


@pytest.mark.parametrize("engine", WITH_AUTO, indirect=True)
def test_repeated_texts_are_sent_once_and_every_id_gets_its_record(engine: str, sim: Any, tmp_path: Path) -> None:
    """Dedupe in every engine: each distinct text costs one request (online or in a batch), every id gets one
    record, and the rows repeating a text name the record they copy in copied_from."""
    sim.configure(batch_seconds=0)
    rows = repeated_rows(90)
    out = tmp_path / "out.parquet"
    summary = run(engine, sim, write_csv(tmp_path / "in.csv", rows), out, online_rows=20)
    distinct = len({text for _, _, text in rows})
    assert requests_sent(sim) == distinct
    assert check_copies(out, rows) == len(rows) - distinct == summary.copies
    assert summary.labeled == len(rows)


def spent(output: Path, tier: str) -> float:
    """What the rows in a sink cost by their own usage, at `tier`."""
    total = 0.0
    for r in open_sink(output).iter_records():
        cost = cost_of(r["model"], r["prompt_tokens"], r["completion_tokens"], tier=tier)
        total += cost or 0.0
    return total


@NEEDS_RAY
@pytest.mark.ray
def test_label_dataset_labels_an_id_repeated_in_the_dataset_once(sim: Any, ray_here: None, tmp_path: Path) -> None:
    """The Ray library path goes through the run's RowGate too: a repeated id in a dataset is labeled once."""
    import ray  # noqa: PLC0415 - the ray extra is optional

    from pipeline.ray import label_dataset, write_labels  # noqa: PLC0415

    items = [{"id": i, "lang": lang, "text": text} for i, lang, text in reviews(60)]
    items += [items[7], {**items[9], "text": "other text, same id"}]
    out = tmp_path / "labels.parquet"
    labeled = label_dataset(ray.data.from_items(items), SENTIMENT, base_url=sim.base_url, actors=1, concurrency=8)
    write_labels(labeled, out)
    ids = sink_ids(out)
    assert sorted(ids) == sorted({item["id"] for item in items})
    assert sim.stats(events=False)["requests"] == 60


def test_a_failed_ray_job_becomes_a_labelstream_error_only_when_it_carries_one() -> None:
    """A Ray failure that carries a labelstream error (a bad key in an actor) is that error; anything else (a
    bug, Ray itself failing) is not turned into an API error, so its traceback shows."""
    from pipeline.engines.ray.engine import _labelstream_error  # noqa: PLC0415 - the rule itself is tested

    carried = FatalApiError("the key was refused", status=401)
    wrapped = RuntimeError("ray task failed")
    wrapped.__cause__ = carried
    assert _labelstream_error(wrapped) is carried
    assert _labelstream_error(KeyError("a bug")) is None
