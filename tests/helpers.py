"""Shared test helpers: CSV writers and a one-call labeling run against the simulator."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.client import RetryPolicy
from pipeline.config import TaskConfig, load_config
from pipeline.limits import LimitSettings
from pipeline.run import RunOptions, run_label
from pipeline.sink import open_sink
from pipeline.summary import Summary

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
    """Run a labeling job in this process against the simulator, progress off."""
    opts = RunOptions(
        input=input_csv,
        output=output,
        config=config,
        limits=options.pop("limits", LimitSettings(concurrency=concurrency)),
        retry=retry,
        base_url=sim.base_url,
        api_key=options.pop("api_key", "sk-test-key"),
        progress=False,
        **options,
    )
    return asyncio.run(run_label(opts, notice=io.StringIO()))


def sink_ids(output: Path) -> list[str]:
    """Every id in a sink, in write order (repeats kept, so tests can see them)."""
    return [r["id"] for r in open_sink(output).iter_records(columns=["id"])]


def dead_letters(output: Path) -> list[dict[str, Any]]:
    """Every dead letter written beside a sink."""
    path = output.with_name(output.name + ".meta") / "dead_letters.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
