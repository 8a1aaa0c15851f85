"""Counters of a run: the client's call counters and the run's row counters, and how to show numbers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.api.pricing import Tier, cost_of
from pipeline.results import Labeled, Result, now_iso


@dataclass(slots=True)
class CallStats:
    """Counters the client updates and the progress reporter reads."""

    retries: int = 0
    rate_limited: int = 0  # 429 answers that were rate limits (never timeouts, even when paced like them)
    timeouts: int = 0  # attempts abandoned without a reply in time
    held: int = 0  # of those, the ones in a cluster: read as overload (a gateway holding requests, a drowning server)
    unavailable: int = 0  # flex: 429 resource_unavailable (retried with backoff; no rate limit)
    hedged: int = 0  # copies sent of a run's last stragglers (hedging.py); each is a request, counted in tokens
    successes: int = 0
    bad_requests_in_a_row: int = 0
    timeouts_before_any_reply: int = 0
    # Every reply's usage, the unusable ones' included (the server did that work too).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # the part of prompt_tokens served from the provider's prompt cache
    logprobs_unread: int = 0  # labeled replies whose logprobs came but gave no confidence
    unusable_replies: int = 0  # replies that came back but gave no label
    unusable_tokens: int = 0  # their prompt and completion tokens (part of the totals above)
    # Abandoned attempts (timed out, or cut off by a stop) may still run upstream and be billed: their worst case,
    # an upper bound.
    abandoned: int = 0
    abandoned_prompt_tokens: int = 0
    abandoned_completion_tokens: int = 0
    gateway: str | None = None  # a gateway that named itself in a reply header ("litellm")


@dataclass(slots=True)
class RunStats:
    """Counters for one run; the workers, the writer and the reader update it, the reporter reads it."""

    calls: CallStats
    model: str
    tier: Tier = "standard"  # the price tier of the online calls (flex bills half)
    started: float = field(default_factory=time.monotonic)
    expected: int | None = None  # rows this run will finish (labeled or dead-lettered)
    expected_exact: bool = False  # False while `expected` is an estimate
    read: int = 0
    skipped_done: int = 0
    duplicates: int = 0
    conflicts: int = 0  # an id seen again with different text
    changed: int = 0  # done ids whose text is now different
    other_shards: int = 0  # input rows another shard labels (--shard)
    copies: int = 0  # rows given the record of an identical text instead of a request (run/dedupe.py)
    labeled: int = 0
    failed: int = 0
    saved: int = 0
    truncated: int = 0
    # The batch engine's counters: replies billed at batch prices, and where its rows stand.
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    batches: int = 0  # batches this run created
    submitted: int = 0  # rows this run sent to the Batch API
    in_batches: int = 0  # rows skipped because a batch still running holds them
    pending: int = 0  # rows in batches still running when the run ended
    unfinished: int = 0  # rows whose batch ended without them (expired, cancelled): sent again next run
    refused: int = 0  # failed rows whose request a server refused as sent (batch): not sent again unchanged
    refused_before: int = 0  # rows left out: their unchanged request was refused as sent before
    duplicate_samples: list[str] = field(default_factory=list)
    conflict_samples: list[str] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)  # kind → up to 3 sample messages
    failure_counts: dict[str, int] = field(default_factory=dict)

    def count_saved(self, rows: int) -> None:
        """Count rows the sink now holds."""
        self.saved += rows

    def count(self, *results: Result) -> None:
        """Count finished rows: labeled, or dead letters."""
        for result in results:
            if isinstance(result, Labeled):
                self.labeled += 1
            else:
                self.record_failure(result.kind, result.row.id, result.message)

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
    def prompt_tokens(self) -> int:
        """Prompt tokens of every reply, online and batch."""
        return self.calls.prompt_tokens + self.batch_prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Completion tokens of every reply, online and batch."""
        return self.calls.completion_tokens + self.batch_completion_tokens

    @property
    def cost(self) -> float | None:
        """Estimated USD spent by this run (online calls at their tier, batch replies at batch prices)."""
        calls = self.calls
        online = cost_of(
            self.model, calls.prompt_tokens, calls.completion_tokens, tier=self.tier, cached_tokens=calls.cached_tokens
        )
        batch = cost_of(self.model, self.batch_prompt_tokens, self.batch_completion_tokens, tier="batch")
        abandoned = self.abandoned_cost
        return None if online is None or batch is None or abandoned is None else online + batch + abandoned

    @property
    def abandoned_cost(self) -> float | None:
        """The most the abandoned attempts may cost (each at its prompt estimate and a full max_tokens): an upper
        bound, part of `cost`."""
        calls = self.calls
        return cost_of(self.model, calls.abandoned_prompt_tokens, calls.abandoned_completion_tokens, tier=self.tier)

    @property
    def standard_cost(self) -> float | None:
        """What the same tokens would have cost as standard online requests."""
        calls = self.calls
        return cost_of(
            self.model,
            self.prompt_tokens + calls.abandoned_prompt_tokens,
            self.completion_tokens + calls.abandoned_completion_tokens,
            cached_tokens=calls.cached_tokens,
        )

    def snapshot(self, state: str, **extra: Any) -> dict[str, Any]:
        """The progress-file document."""
        return {
            "state": state,
            "pid": os.getpid(),
            "updated_at": now_iso(),
            "elapsed_s": round(self.elapsed, 1),
            "expected": self.expected,
            "expected_exact": self.expected_exact,
            "read": self.read,
            "labeled": self.labeled,
            "failed": self.failed,
            "saved": self.saved,
            "skipped_done": self.skipped_done,
            "duplicates": self.duplicates,
            "other_shards": self.other_shards,
            "retries": self.calls.retries,
            "rate_limited": self.calls.rate_limited,
            "timeouts": self.calls.timeouts,
            "abandoned": self.calls.abandoned,
            "unusable_replies": self.calls.unusable_replies,
            "rows_per_s": round(self.rate, 2),
            "eta_s": None if self.eta is None else round(self.eta, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.calls.cached_tokens,
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
