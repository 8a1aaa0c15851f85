"""Live progress: a tqdm bar on a terminal, plain log lines otherwise, and a JSON progress file.

The progress file (`OUT.meta/progress.json`) is replaced atomically about once a second so other
tools (dashboards, `labelstream status`, a batch scheduler) can read it at any moment.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from tqdm import tqdm

from pipeline.client import CallStats
from pipeline.clock import now_iso

# USD per million tokens (input, output) for models whose price we know; others show no cost.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}


def price_of(model: str) -> tuple[float, float] | None:
    """Known price of a model or of its dated snapshot (gpt-4o-mini-2024-07-18 → gpt-4o-mini)."""
    for name in sorted(PRICES, key=len, reverse=True):
        if model == name or model.startswith(name + "-2"):
            return PRICES[name]
    return None


@dataclass(slots=True)
class RunStats:
    """Counters for one run; the workers, the writer and the reader update it, the reporter reads it."""

    calls: CallStats
    model: str
    started: float = field(default_factory=time.monotonic)
    expected: int | None = None  # rows this run should label, once the input has been counted
    read: int = 0
    skipped_done: int = 0
    duplicates: int = 0
    labeled: int = 0
    failed: int = 0
    saved: int = 0
    truncated: int = 0
    duplicate_samples: list[str] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)  # kind → up to 3 sample messages
    failure_counts: dict[str, int] = field(default_factory=dict)

    def record_failure(self, kind: str, row_id: str, message: str) -> None:
        """Count a dead letter and keep a few samples of each kind."""
        self.failed += 1
        self.failure_counts[kind] = self.failure_counts.get(kind, 0) + 1
        samples = self.failures.setdefault(kind, [])
        if len(samples) < 3:
            samples.append(f"{row_id}: {message}")

    @property
    def finished(self) -> int:
        """Rows this run has finished, labeled or failed."""
        return self.labeled + self.failed

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Finished rows per second."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, if the total is known."""
        if self.expected is None or self.rate <= 0:
            return None
        return max(0.0, (self.expected - self.finished) / self.rate)

    @property
    def cost(self) -> float | None:
        """Estimated USD spent by this run, for models with a known price."""
        price = price_of(self.model)
        if price is None:
            return None
        return (self.calls.prompt_tokens * price[0] + self.calls.completion_tokens * price[1]) / 1e6

    def snapshot(self, state: str, **extra: Any) -> dict[str, Any]:
        """The progress-file document."""
        return {
            "state": state,
            "pid": os.getpid(),
            "updated_at": now_iso(),
            "elapsed_s": round(self.elapsed, 1),
            "expected": self.expected,
            "read": self.read,
            "labeled": self.labeled,
            "failed": self.failed,
            "saved": self.saved,
            "skipped_done": self.skipped_done,
            "duplicates": self.duplicates,
            "retries": self.calls.retries,
            "rate_limited": self.calls.rate_limited,
            "rows_per_s": round(self.rate, 2),
            "eta_s": None if self.eta is None else round(self.eta, 1),
            "prompt_tokens": self.calls.prompt_tokens,
            "completion_tokens": self.calls.completion_tokens,
            "cost_usd": None if self.cost is None else round(self.cost, 6),
            **extra,
        }


def short_number(n: float) -> str:
    """1234 → 1.2k, 3_400_000 → 3.4M."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def short_duration(seconds: float | None) -> str:
    """95 → 1m35s."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Reporter:
    """Shows progress on stderr: a tqdm bar on a terminal, a log line every `log_every` seconds otherwise."""

    def __init__(
        self,
        stats: RunStats,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        log_every: float = 10.0,
        concurrency: Callable[[], str] | None = None,
    ) -> None:
        self.stats = stats
        self.stream = stream or sys.stderr
        self.concurrency = concurrency
        self.log_every = log_every
        self._last_log = 0.0
        self.tty = enabled and self.stream.isatty()
        self.enabled = enabled
        self._bar: tqdm[Any] | None = None
        if self.tty:
            self._bar = tqdm(total=stats.expected, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def line(self) -> str:
        """One-line status, shared by the bar's postfix and the plain log."""
        s = self.stats
        parts = [f"{s.labeled} done", f"{s.failed} failed", f"{s.calls.retries} retries"]
        if s.calls.rate_limited:
            parts.append(f"{s.calls.rate_limited}×429")
        if self.concurrency is not None:
            parts.append(f"in flight {self.concurrency()}")
        parts.append(f"{short_number(s.calls.prompt_tokens + s.calls.completion_tokens)} tok")
        if s.cost is not None:
            parts.append(f"${s.cost:.4f}")
        return " | ".join(parts)

    def update(self) -> None:
        """Refresh the bar, or print a log line when one is due."""
        s = self.stats
        if self._bar is not None:
            if s.expected is not None and self._bar.total != s.expected:
                self._bar.total = s.expected
            self._bar.n = s.finished
            self._bar.set_postfix_str(self.line(), refresh=False)
            self._bar.refresh()
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if s.finished and now - self._last_log >= self.log_every:
            self._last_log = now
            self.log_line()

    def log_line(self) -> None:
        """Print one plain progress line."""
        s = self.stats
        total = f"/{s.expected}" if s.expected is not None else ""
        print(
            f"labelstream: {s.finished}{total} rows | {self.line()} | {s.rate:.1f} rows/s | "
            f"ETA {short_duration(s.eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Finish the bar (the summary follows it)."""
        if self._bar is not None:
            self.update()
            self._bar.close()
            self._bar = None
