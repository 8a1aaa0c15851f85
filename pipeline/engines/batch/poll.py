"""Waiting for batches: look at each live batch, collect the ones that ended, back off while nothing changes,
and show how far they are (a bar on a terminal, a log line every 10 s elsewhere, the progress file always)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import IO, Any, Literal

from openai.types import Batch
from tqdm import tqdm

from pipeline.engines.batch.api import BatchApi
from pipeline.engines.batch.ledger import ENDED, SUBMITTED, Ledger, Submission
from pipeline.engines.batch.settings import BatchSettings
from pipeline.engines.batch.submit import counts_of
from pipeline.stats import short_duration

Collect = Callable[[Submission, Batch], Awaitable[None]]


class BatchProgress:
    """Batch states, request counts and an ETA: a bar on a terminal, else a log line every `log_every` s."""

    def __init__(self, *, mode: Literal["auto", "log", "off"], stream: IO[str], log_every: float = 10.0) -> None:
        self.mode, self.stream, self.log_every = mode, stream, log_every
        self.seen: dict[str, tuple[int, int, str]] = {}  # submission → (total, finished, status)
        self.started = time.monotonic()
        self.first: int | None = None  # requests finished at the first look, the base of the rate
        self._last_log = -1e9
        self._bar: tqdm[Any] | None = None
        if mode == "auto" and stream.isatty():
            self._bar = tqdm(total=0, unit="req", file=stream, dynamic_ncols=True)

    def observe(self, sub: Submission) -> None:
        """Take in a submission's latest counts and status."""
        counts = sub.counts
        finished = counts.get("completed", 0) + counts.get("failed", 0)
        self.seen[sub.id] = (counts.get("total") or sub.requests, finished, sub.status or sub.state)

    @property
    def total(self) -> int:
        """Requests in every batch watched."""
        return sum(total for total, _, _ in self.seen.values())

    @property
    def finished(self) -> int:
        """Requests those batches have finished."""
        return sum(finished for _, finished, _ in self.seen.values())

    @property
    def eta(self) -> float | None:
        """Seconds until every watched request is finished, at the rate seen since the first look."""
        if self.first is None:
            return None
        rate = (self.finished - self.first) / max(1e-9, time.monotonic() - self.started)
        return (self.total - self.finished) / rate if rate > 0 else None

    def line(self) -> str:
        """Batch states, request counts and ETA on one line."""
        states = Counter(status for _, _, status in self.seen.values())
        shown = ", ".join(f"{n} {status}" for status, n in sorted(states.items()))
        return f"batches: {shown} | requests {self.finished:,}/{self.total:,} | ETA {short_duration(self.eta)}"

    def update(self) -> None:
        """Refresh the bar, or log a line when one is due."""
        if self.first is None:
            self.first, self.started = self.finished, time.monotonic()
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.n = self.finished
            self._bar.set_postfix_str(self.line(), refresh=False)
            self._bar.refresh()
        elif self.mode != "off" and time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            print(f"labelstream: {self.line()}", file=self.stream, flush=True)

    def as_dict(self) -> dict[str, Any]:
        """The progress file's `batches` part."""
        states = Counter(status for _, _, status in self.seen.values())
        eta = self.eta
        return {
            "states": dict(states),
            "requests": self.total,
            "finished": self.finished,
            "eta_s": None if eta is None else round(eta, 1),
        }

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def refresh(api: BatchApi, ledger: Ledger, collect: Collect, progress: BatchProgress | None = None) -> bool:
    """Look at every submitted batch once and collect those that ended; whether anything changed."""
    changed = False
    for sub in [s for s in ledger.live if s.state == SUBMITTED and s.batch_id]:
        batch = await api.retrieve(sub.batch_id or "")
        counts = counts_of(batch)
        if (batch.status, counts) != (sub.status, sub.counts):
            changed = True
            sub.status, sub.counts = batch.status, counts
        if batch.status in ENDED:
            await collect(sub, batch)
            changed = True
        if progress is not None:
            progress.observe(sub)
    if changed:
        ledger.save(durable=False)  # statuses and counts only: what they say is looked up again anyway
    return changed


async def wait_for_batches(
    api: BatchApi,
    ledger: Ledger,
    *,
    collect: Collect,
    progress: BatchProgress,
    settings: BatchSettings,
    stopping: asyncio.Event,
    report: Callable[[], None],
) -> None:
    """Look at the live batches until every one has ended and is collected, or `stopping` is set.

    The pause between looks starts at `poll_seconds` and grows by half while nothing changes, up to
    `poll_max_seconds`; any change brings it back down.
    """
    pause = settings.poll_seconds
    while not stopping.is_set():
        changed = await refresh(api, ledger, collect, progress)
        progress.update()
        report()
        if not any(s.state == SUBMITTED for s in ledger.live):
            return
        pause = settings.poll_seconds if changed else min(pause * 1.5, settings.poll_max_seconds)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await stopping.wait()
