"""How many requests may be in flight and when the next one may start.

One `Limiter` is shared by all workers of a run. A worker takes a slot right before its HTTP call; the
slot waits for (1) a global pause after a 429 or when the provider says its window is spent, (2) the
requests-per-minute and tokens-per-minute buckets, and (3) the concurrency window. What the window and
the paced rate should be is the `Pacer`'s job (`pacing.py`): Little's law once a limit is known, slow
start before (in auto mode the `Knee` of `knee.py`, which stops at a self-hosted server's knee), a rate
learned from 429s when the provider says nothing.

- Buckets run at 95% of the limits given (`--rpm`, `--tpm`) or learned from `x-ratelimit-limit-*`
  headers, whichever is lower, times this process's share of the key (`share`), so the run stays under
  the provider's limit before the first 429.
- `--concurrency N` is a hard ceiling; auto has only a safety cap (`AUTO_CEILING`), and the HTTP
  connection pool is sized to the ceiling.

aiolimiter was the first choice for the buckets; it cannot do the job here: it refuses a request larger
than its bucket (one long document under a small TPM), cannot hand back tokens when `usage` shows the
estimate was high, reads the loop's clock (no injectable clock for tests) and cannot be paused from a
provider's Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol

from pipeline.ratelimit.buckets import Clock, TokenBucket
from pipeline.ratelimit.headers import number, parse_duration, provider_view
from pipeline.ratelimit.pacing import START_WINDOW, Pacer

Sleep = Callable[[float], Awaitable[None]]

# Stay this far under a known limit: the provider's window and ours never line up exactly.
SAFETY: Final = 0.95
# Auto's safety cap on requests in flight: 12,000 RPM at 20 s latency needs 4,000.
AUTO_CEILING: Final = 4096
# A request bucket that may burst a whole second would let 2 s of requests into one second (a full bucket plus
# its refill), and providers also enforce their limits per second. Any second holds at most the rate plus the
# burst: at 95% of the limit a twentieth of a second keeps that under the limit.
REQUEST_BURST: Final = 0.05
# Under ~25 requests/s that is less than one request, and a bucket holding exactly one loses every moment a
# sleep oversleeps (2% at 20/s): it may also hold this many seconds more, which any second absorbs.
SLEEP_SLACK: Final = 0.01
DEFAULT_PAUSE: Final = 1.0  # seconds to pause after a 429 that says nothing about when to come back

__all__ = ["AUTO_CEILING", "SAFETY", "START_WINDOW", "LimitSettings", "Limiter", "Permit", "RetryPolicy", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Run-level limits: a concurrency ceiling (or auto), optional RPM/TPM, and this process's share of them."""

    concurrency: int = 10
    auto: bool = False
    rpm: float | None = None
    tpm: float | None = None
    share: float = 1.0  # this process's part of every limit on the key (--rate-share), given or learned

    @classmethod
    def automatic(cls, *, rpm: float | None = None, tpm: float | None = None, share: float = 1.0) -> LimitSettings:
        """`--concurrency auto`: start at 10 and find the level the provider sustains, up to a safety cap."""
        return cls(concurrency=AUTO_CEILING, auto=True, rpm=rpm, tpm=tpm, share=share)


class LimitStore(Protocol):
    """Where the limits a run learns are kept for the next run (a sink's `limits.json`): the key's figures."""

    def recall(self) -> dict[str, float]:
        """Remembered `rpm`, `tpm` (announced), `rate` (requests/s taught by 429s) and `window`, where fresh."""
        ...

    def keep(self, figures: Mapping[str, float | None]) -> None:
        """Remember these figures (None: not learned)."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter; `max_attempts` counts the first try."""

    max_attempts: int = 6
    base_wait: float = 0.5
    max_wait: float = 20.0
    timeout: float = 60.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt `attempt + 1`."""
        return rng.uniform(0, min(self.max_wait, self.base_wait * 2 ** (attempt - 1)))


@dataclass(slots=True)
class Permit:
    """One taken slot; the worker reports what the request really cost through it."""

    estimated_tokens: int
    started: float
    window_limited: bool = False
    used_tokens: int | None = None


class Limiter:
    """Gate for every API call of a run (see the module docstring)."""

    def __init__(self, settings: LimitSettings, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.pacer = Pacer(ceiling=settings.concurrency, auto=settings.auto, clock_start=clock())
        self.in_flight = 0
        self.pause_until = 0.0
        self.share = settings.share
        self._key_rpm = settings.rpm  # the key's limits, given or learned from headers (before the share)
        self._key_tpm = settings.tpm
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self._tokens_per_request: float | None = None
        self._turn = asyncio.Lock()  # FIFO: the longest waiter goes first
        self._queued = 0  # requests waiting for their turn
        self.on_grow: Callable[[], None] | None = None  # called when the window grows (the run adds workers)
        self._freed = asyncio.Event()
        self._memory: LimitStore | None = None
        self._remembered: dict[str, float] = {}  # the key's figures an earlier run learned (see remembering)
        self._refit()

    @property
    def _known_rpm(self) -> float | None:
        # Announced by headers or given beats remembered: the provider may have changed the limit since.
        key = self._key_rpm or self._remembered.get("rpm")
        return key * self.share if key else None

    @property
    def _known_tpm(self) -> float | None:
        key = self._key_tpm or self._remembered.get("tpm")
        return key * self.share if key else None

    @property
    def ceiling(self) -> int:
        """The most requests that may ever be in flight (the HTTP pool is sized to it)."""
        return self.pacer.ceiling

    @property
    def window(self) -> float:
        """The current in-flight window."""
        return self.pacer.window

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self.pacer.limit

    @property
    def tpm_limited(self) -> bool:
        """Whether a tokens-per-minute limit is in force (given or learned)."""
        return self._tpm is not None

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[Permit]:
        """Wait for room for one request of about `estimated_tokens` tokens, hold it for the call."""
        permit = await self._acquire(estimated_tokens)
        try:
            yield permit
        finally:
            self.in_flight -= 1
            self._freed.set()

    def has_room(self, estimated_tokens: int) -> bool:
        """Whether a request could start now without waiting for the window, a pause or a bucket."""
        return self.in_flight < self.limit and not self._queued and self._time_gate(estimated_tokens) <= 1e-6

    def on_success(self, permit: Permit) -> None:
        """A request succeeded: correct the TPM estimate, note its latency, and let the pacer adjust."""
        if permit.used_tokens is not None:
            used = permit.used_tokens
            self._tokens_per_request = (
                used
                if self._tokens_per_request is None
                else (self._tokens_per_request + 0.05 * (used - self._tokens_per_request))
            )
            if self._tpm is not None:
                surplus = permit.estimated_tokens - used
                if surplus > 0:
                    self._tpm.give_back(surplus)
                else:
                    self._tpm.take(-surplus)
        now = self.clock()
        before, limit, learned = self.pacer.rate(), self.limit, self.pacer.learned_rate
        self.pacer.on_success(now - permit.started, window_limited=permit.window_limited, now=now)
        if self.pacer.learned_rate != learned:
            self._keep()
        if self._known_tpm or self.pacer.rate() != before:
            self._pace()  # a TPM limit's request rate follows the tokens a request really costs
        if self.limit > limit and self.on_grow is not None:
            self.on_grow()
        self._freed.set()

    def on_rate_limited(self, retry_after: float | None, *, refused: bool = True) -> None:
        """A 429 arrived (or, not `refused`, timeouts clustered): pause every worker for `retry_after`, and (once
        per overload) slow the pace."""
        now = self.clock()
        wait = retry_after if retry_after is not None and retry_after > 0 else self.pacer.quiet_pause(now)
        self.pause_until = max(self.pause_until, now + wait)
        if self.pacer.on_overload(now, until=self.pause_until, refused=refused):
            self._pace()
            if self._rpm is not None:
                self._rpm.drain(self.pause_until)
        self._freed.set()

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn the provider's limits from `x-ratelimit-*` headers and pause when its window is spent."""
        headers = provider_view(headers)
        changed = False
        limit_requests = number(headers.get("x-ratelimit-limit-requests"))
        if limit_requests:
            known = min(limit_requests, self._key_rpm or math.inf)
            changed |= known != self._key_rpm
            self._key_rpm = known
        limit_tokens = number(headers.get("x-ratelimit-limit-tokens"))
        if limit_tokens:
            known = min(limit_tokens, self.settings.tpm or math.inf)
            changed |= known != self._key_tpm
            self._key_tpm = known
        if changed:
            self._refit()
            self._keep()
        # The key's window is spent (others share it, or the provider counts differently): wait for its reset.
        remaining = number(headers.get("x-ratelimit-remaining-requests"))
        if remaining is not None and remaining < 1:
            seconds = parse_duration(headers.get("x-ratelimit-reset-requests") or "")
            if seconds:
                self.pause_until = max(self.pause_until, self.clock() + seconds)

    def set_share(self, share: float) -> None:
        """Take `share` of the key's limits from now on (siblings on the key finished or came back)."""
        if share != self.share:
            self.pacer.rescale(share / self.share)
            self.share = share
            self._refit()

    def remembering(self, memory: LimitStore) -> Limiter:
        """Start from the limits `memory` recalls (at this process's share) and keep there what is learned."""
        self._memory, self._remembered = memory, memory.recall()
        if rate := self._remembered.get("rate"):
            self.pacer.recall(rate * self.share, window=self._remembered.get("window", 0.0))
        self._refit()
        return self

    def _keep(self) -> None:
        """Tell the memory what was learned (rare: the first headers, an overload's measure), as the key's figures."""
        if self._memory is None:
            return
        settings, remembered, learned = self.settings, self._remembered, self.pacer.learned_rate
        self._memory.keep(
            {
                "rpm": self._key_rpm if self._key_rpm != settings.rpm else remembered.get("rpm"),
                "tpm": self._key_tpm if self._key_tpm != settings.tpm else remembered.get("tpm"),
                "rate": learned / self.share if learned else None,
                "window": self.pacer.admissions.window or None,
            }
        )

    def _refit(self) -> None:
        """The known limits are new or changed: size the token bucket, the pace and the window to them."""
        limit = self.limit
        known_tpm = self._known_tpm
        if known_tpm and self._tpm is None:
            self._tpm = TokenBucket(known_tpm * SAFETY, self.clock)
        elif known_tpm and self._tpm is not None:
            self._tpm.set_rate(known_tpm * SAFETY)  # keeps what the bucket holds
        self._pace()
        if self.limit > limit and self.on_grow is not None:
            self.on_grow()

    def _pace(self) -> None:
        """Hand the known limits to the pacer as a request rate; set the request bucket to the paced rate."""
        rates = []
        if self._known_rpm:
            rates.append(self._known_rpm * SAFETY / 60)
        if self._known_tpm and self._tokens_per_request:
            rates.append(self._known_tpm * SAFETY / 60 / self._tokens_per_request)
        self.pacer.set_known_rate(min(rates) if rates else None)
        # The request bucket paces at the known RPM and at any rate learned from 429s (not at the TPM-derived
        # rate: the token bucket spaces tokens itself, exactly).
        paced = [self._known_rpm * SAFETY / 60] if self._known_rpm else []
        if self.pacer.probe_rate is not None:
            paced.append(self.pacer.probe_rate)
        if not paced:
            self._rpm = None
        elif self._rpm is None:
            # Empty at first: the requests sent before this limit was known already used the current second.
            self._rpm = TokenBucket(
                min(paced) * 60, self.clock, burst_seconds=REQUEST_BURST, slack=SLEEP_SLACK, full=self.in_flight == 0
            )
        else:
            self._rpm.set_rate(min(paced) * 60)

    async def _acquire(self, estimated_tokens: int) -> Permit:
        self._queued += 1
        turn = False
        try:
            async with self._turn:
                self._queued -= 1
                turn = True
                return await self._take(estimated_tokens)
        finally:
            if not turn:  # cancelled before its turn came
                self._queued -= 1

    async def _take(self, estimated_tokens: int) -> Permit:
        waited_for_window = waited_for_time = False
        while True:
            while self.in_flight >= self.limit:
                waited_for_window = True
                self._freed.clear()
                await self._freed.wait()
            wait = self._time_gate(estimated_tokens)
            if wait <= 1e-6:
                break
            waited_for_time = True
            await self.sleep(wait)
        if self._rpm is not None:
            self._rpm.take(1)
        if self._tpm is not None:
            self._tpm.take(estimated_tokens)
        self.in_flight += 1
        # Grow only when the window is what holds requests back, not the buckets or the input: this request
        # waited for a free slot, or more are queued than the window has room for, and no bucket held it.
        limited = not waited_for_time and (waited_for_window or self.in_flight + self._queued >= self.limit)
        return Permit(estimated_tokens=estimated_tokens, started=self.clock(), window_limited=limited)

    def _time_gate(self, estimated_tokens: int) -> float:
        wait = self.pause_until - self.clock()
        if self._rpm is not None:
            wait = max(wait, self._rpm.delay(1))
        if self._tpm is not None:
            wait = max(wait, self._tpm.delay(estimated_tokens))
        return wait
