"""What the compat tests share: inputs, the CLI against a real endpoint, and the figures a run leaves behind."""

from __future__ import annotations

import csv
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ..helpers import ROOT, cli, write_csv
from .servers import COMPAT_VENV

SAMPLE = ROOT / "configs" / "sample_reviews.csv"
CONFIG = ROOT / "configs" / "sentiment.toml"
LABELS = {"positive", "negative", "neutral"}
# Figures of the last `make test-compat` (auto vs fixed concurrency, timings), for docs/compat.md.
RESULTS = COMPAT_VENV / "compat-results.jsonl"


def sample_rows(n: int, prefix: str = "") -> list[tuple[str, str, str]]:
    """The first n rows of the project's sample reviews (id, lang, text), repeated with new ids past its end."""
    with SAMPLE.open(encoding="utf-8", newline="") as handle:
        base = [(r["id"], r["lang"], r["text"]) for r in csv.DictReader(handle)]
    return [(f"{prefix}{i:05d}-{base[i % len(base)][0]}", *base[i % len(base)][1:]) for i in range(n)]


def sample_csv(path: Path, n: int, extra: Sequence[tuple[str, str, str]] = ()) -> Path:
    """A CSV of n sample rows plus `extra` rows."""
    return write_csv(path, [*sample_rows(n), *extra])


def long_row(row_id: str = "too-long") -> tuple[str, str, str]:
    """A row far over the tiny model's 2,048-token context but under the task's max_chars (8,000), so it is not cut.

    Hangul syllables the tokenizer never saw cost 2-3 byte-level tokens each: ~7,000 of them are >10,000 tokens.
    """
    return (row_id, "ko", "".join(chr(0xAC00 + (i * 7919) % 11172) for i in range(7000)))


def label_cli(
    base_url: str,
    inp: Path,
    out: Path,
    *args: str,
    model: str = "tiny",
    key: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """`labelstream label` against a real endpoint, progress off."""
    return cli(
        "label",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--config",
        str(CONFIG),
        "--model",
        model,
        "--base-url",
        base_url,
        "--no-progress",
        *args,
        env=None if key is None else {"OPENAI_API_KEY": key},
        timeout=timeout,
    )


def records(out: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL sink."""
    return [orjson.loads(line) for line in out.read_bytes().splitlines()] if out.exists() else []


def latency_figures(out: Path) -> dict[str, float]:
    """p50 and p99 of the sink's per-row latency, in seconds."""
    lat = sorted(r["latency_ms"] / 1000 for r in records(out))
    cuts = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50_s": round(cuts[49], 3), "p99_s": round(cuts[98], 3)}


def record_result(name: str, **figures: Any) -> None:
    """Append one measurement to the results file that `make test-compat` prints at the end."""
    with RESULTS.open("ab") as handle:
        handle.write(orjson.dumps({"test": name, **figures}) + b"\n")
