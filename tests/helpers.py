"""Shared test helpers: CSV writers and a one-call labeling run against the simulator."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.engines import run_label
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.run.options import RunOptions
from pipeline.run.summary import Summary
from pipeline.sinks import open_sink
from pipeline.task.config import TaskConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SENTIMENT = load_config(ROOT / "configs" / "sentiment.toml")
FAST_RETRY = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=5.0)


def write_csv(path: Path, rows: Iterable[Sequence[str]], header: Sequence[str] = ("id", "lang", "text")) -> Path:
    """Write rows with Python's csv module (quoting as needed)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def reviews(n: int, prefix: str = "r") -> list[tuple[str, str, str]]:
    """n distinct rows, alternating Korean and English."""
    return [
        (f"{prefix}{i:05d}", "ko" if i % 2 else "en", f"리뷰 {i}: 배송이 빨라요" if i % 2 else f"review {i}: fine")
        for i in range(n)
    ]


def label(
    sim: Any,
    input_csv: Path,
    output: Path,
    *,
    config: TaskConfig = SENTIMENT,
    concurrency: int = 8,
    retry: RetryPolicy = FAST_RETRY,
    **options: Any,
) -> Summary:
    """Run a labeling job in this process against the simulator, progress off (notes go to `notice`, if given)."""
    notice = options.pop("notice", None)
    opts = RunOptions.build(
        input_csv,
        output,
        config,
        limits=options.pop("limits", LimitSettings(concurrency=concurrency)),
        retry=retry,
        base_url=options.pop("base_url", sim.base_url),
        api_key=options.pop("api_key", "sk-test-key"),
        progress="off" if notice is None else "log",
        **options,
    )
    return asyncio.run(run_label(opts, notice=notice or io.StringIO()))


def label_batch(
    sim: Any,
    input_csv: Path,
    output: Path,
    *,
    engine: str = "batch",
    config: TaskConfig = SENTIMENT,
    **options: Any,
) -> Summary:
    """Run the batch (or auto) engine in this process against the simulator; BatchSettings fields go in `options`."""
    from pipeline.engines import run_engine  # noqa: PLC0415 - only these tests need the engines
    from pipeline.engines.batch.settings import BatchSettings  # noqa: PLC0415

    names = set(BatchSettings.__dataclass_fields__)
    settings = BatchSettings(**{"poll_seconds": 0.02, **{k: options.pop(k) for k in list(options) if k in names}})
    notice = options.pop("notice", None)
    opts = RunOptions.build(
        input_csv,
        output,
        config,
        limits=options.pop("limits", LimitSettings(concurrency=8)),
        retry=options.pop("retry", FAST_RETRY),
        base_url=sim.base_url,
        api_key=options.pop("api_key", "sk-test-key"),
        progress="off" if notice is None else "log",
        **options,
    )
    return asyncio.run(run_engine(engine, opts, batch=settings, notice=notice or io.StringIO()))


def ledger(output: Path) -> dict[str, Any]:
    """The batch engine's ledger beside a sink ({} before the first batch run)."""
    path = output.with_name(output.name + ".meta") / "batches.json"
    return dict(orjson.loads(path.read_bytes())) if path.exists() else {}


def sink_ids(output: Path) -> list[str]:
    """Every id in a sink, in write order (repeats kept, so tests can see them)."""
    return [r["id"] for r in open_sink(output).iter_records(columns=["id"])]


def ids_once(output: Path) -> set[str]:
    """The ids in a sink, failing if any is there twice (counting `set(sink_ids(...))` would hide the repeat)."""
    ids = sink_ids(output)
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    assert not repeated, f"{len(repeated)} ids written more than once, e.g. {repeated[:3]}"
    return set(ids)


def dead_letters(output: Path) -> list[dict[str, Any]]:
    """Every dead letter written beside a sink."""
    path = output.with_name(output.name + ".meta") / "dead_letters.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


TEST_KEY = "sk-test-LABELSTREAM-SECRET-0123456789abcdef"


def label_args(sim: Any, source: Path, output: Path, *extra: str) -> list[str]:
    """The CLI's `label` arguments for `source` into `output` against the simulator, progress as plain log lines."""
    return [
        "label", "--input", str(source), "--output", str(output), "--base-url", sim.base_url, "--no-progress", *extra,
    ]  # fmt: skip


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (`python -m pipeline`) in a subprocess and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=cli_env(env),
        check=False,
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the real CLI in a subprocess (for signal and crash tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(env),
    )


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for CLI subprocesses: a recognisable test key, no inherited endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = TEST_KEY
    env.update(extra or {})
    return env


def kill_at_random_moments(
    start: Callable[[], subprocess.Popen[str]],
    rng: random.Random,
    *,
    between: tuple[float, float],
    check: Callable[[], None],
    most: int = 8,
) -> int:
    """Start a CLI run and SIGKILL it after a random `between` seconds, again and again (`most` times, or until a run
    finishes before its kill), calling `check` on what each kill left; returns how many kills landed mid-run."""
    kills = 0
    while kills < most:
        proc = start()
        # The moment of the kill is random (this is not synchronisation: any moment must be safe).
        time.sleep(rng.uniform(*between))
        proc.kill()
        proc.communicate(timeout=30)
        if proc.returncode == 0:
            break  # the run finished before the kill came: nothing left to interrupt
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        check()
    return kills


def wait_for(condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll an observable condition (not a fixed sleep) until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def progress(output: Path) -> dict[str, Any]:
    """The progress file of a sink ({} until the first write)."""
    path = output.with_name(output.name + ".meta") / "progress.json"
    try:
        return dict(orjson.loads(path.read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
