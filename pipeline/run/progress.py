"""Live progress on stderr: a tqdm bar on a terminal, a plain log line every 10 s otherwise, nothing with --quiet.

The progress file (`OUT.meta/progress.json`, written by the run) is the machine-readable twin.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Literal

from tqdm import tqdm

from pipeline.stats import RunStats, short_duration, short_number

_BAR = "{l_bar}{bar}| {n_fmt}/%s{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Reporter:
    """Shows progress: `mode` "auto" draws a bar on a terminal and logs a line every `log_every` seconds
    elsewhere, "log" always logs, "off" prints nothing."""

    def __init__(
        self,
        stats: RunStats,
        *,
        mode: Literal["auto", "log", "off"] = "auto",
        stream: IO[str] | None = None,
        log_every: float = 10.0,
        concurrency: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.stats = stats
        self.stream = stream or sys.stderr
        self.concurrency = concurrency
        self.log_every = log_every
        self.mode = mode
        self._last_log = -math.inf  # the first line comes with the first finished row
        self._bar: tqdm[Any] | None = None
        if mode == "auto" and self.stream.isatty():
            self._bar = tqdm(total=stats.expected, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def total(self) -> str:
        """The expected row count as shown: "~1.2k"-style while it is an estimate, exact once the reader knows."""
        s = self.stats
        if s.expected is None:
            return "?"
        return f"{s.expected:,}" if s.expected_exact else f"~{s.expected:,}"

    def line(self) -> str:
        """One-line status, shared by the bar's postfix and the plain log."""
        s = self.stats
        parts = [f"{s.labeled} done", f"{s.failed} failed", f"{s.calls.retries} retries"]
        if s.calls.rate_limited:
            parts.append(f"{s.calls.rate_limited}×429")
        if s.calls.timeouts:  # never folded into the 429s, even when paced like them
            parts.append(f"{s.calls.timeouts} timeouts")
        if self.concurrency is not None:
            in_flight, limit = self.concurrency()
            parts.append(f"in flight {in_flight}/{limit}")
        parts.append(f"{short_number(s.prompt_tokens + s.completion_tokens)} tok")
        if s.cost is not None:
            parts.append(f"${s.cost:.4f}")
        return " | ".join(parts)

    def update(self) -> None:
        """Refresh the bar, or print a log line when one is due."""
        s = self.stats
        if self._bar is not None:
            if self._bar.total != s.expected:
                self._bar.total = s.expected
            self._bar.bar_format = _BAR % ("" if s.expected_exact else "~")
            self._bar.n = s.finished
            self._bar.set_postfix_str(self.line(), refresh=False)
            self._bar.refresh()
            return
        if self.mode == "off":
            return
        now = time.monotonic()
        if s.finished and now - self._last_log >= self.log_every:
            self._last_log = now
            self.log_line()

    def log_line(self) -> None:
        """Print one plain progress line."""
        s = self.stats
        print(
            f"labelstream: {s.finished:,}/{self.total()} rows | {self.line()} | {s.rate:.1f} rows/s | "
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
