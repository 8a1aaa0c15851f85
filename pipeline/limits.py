"""How many requests may be in flight and when the next one may start.

One `Limiter` is shared by all workers of a run. A worker takes a slot right before its HTTP call;
the slot waits for (1) a global pause after a 429, (2) the requests-per-minute and tokens-per-minute
buckets, and (3) the concurrency window. The window is AIMD: it halves on a 429 and grows back by
about one request per round trip while requests succeed.

aiolimiter was the first choice for (2); it cannot do the job here: it refuses a request larger than
its bucket (one long document under a small TPM), cannot hand back tokens when `usage` shows the
estimate was high, reads the loop's clock (no injectable clock for tests) and cannot be paused from
a provider's `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Stay this far under a known limit: the provider's window and ours never line up exactly.
SAFETY = 0.95


class TokenBucket:
    """A token bucket that may go into debt, so one request larger than the bucket still passes.

    `per_minute` is the sustained rate; up to `burst_seconds` of it may be spent at once.
    """

    def __init__(self, per_minute: float, clock: Clock, *, burst_seconds: float = 1.0) -> None:
        self.clock = clock
        self.burst_seconds = burst_seconds
        self.per_minute = per_minute
        self._level = self.capacity
        self._stamp = clock()

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        """The most the bucket holds (at least one request's worth)."""
        return max(1.0, self.rate * self.burst_seconds)

    def set_rate(self, per_minute: float) -> None:
        """Change the sustained rate, keeping what is already in the bucket."""
        self._refill()
        self.per_minute = per_minute
        self._level = min(self._level, self.capacity)

    def delay(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0 if now); a request larger than the bucket waits for a full one."""
        self._refill()
        need = min(amount, self.capacity)
        # The epsilon keeps float rounding from producing waits too small to move the clock.
        return 0.0 if self._level >= need - 1e-9 else (need - self._level) / self.rate

    def take(self, amount: float) -> None:
        """Spend `amount` (possibly going into debt)."""
        self._refill()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        """Return `amount` (an over-estimate corrected after the reply)."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def _refill(self) -> None:
        now = self.clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Run-level limits: a concurrency ceiling (or auto), and optional RPM/TPM."""

    concurrency: int = 10
    auto: bool = False
    auto_start: int = 10
    rpm: float | None = None
    tpm: float | None = None


@dataclass(slots=True)
class Permit:
    """One taken slot; the worker reports the real token use through it."""

    estimated_tokens: int
    started: float
    used_tokens: int | None = None


class Limiter:
    """Gate for every API call of a run (see the module docstring)."""

    def __init__(self, settings: LimitSettings, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.ceiling = max(1, settings.concurrency)
        start = min(settings.auto_start, self.ceiling) if settings.auto else self.ceiling
        self.window = float(start)
        self.in_flight = 0
        self.pause_until = 0.0
        self.rate_limited = 0
        self._last_cut = -math.inf
        self._rpm = TokenBucket(settings.rpm * SAFETY, clock) if settings.rpm else None
        self._tpm = TokenBucket(settings.tpm * SAFETY, clock, burst_seconds=6.0) if settings.tpm else None
        self._turn = asyncio.Lock()  # FIFO: the longest waiter goes first
        self._freed = asyncio.Event()

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return max(1, min(self.ceiling, int(self.window)))

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[Permit]:
        """Wait for room for one request of about `estimated_tokens` tokens, hold it for the call."""
        permit = await self._acquire(estimated_tokens)
        try:
            yield permit
        finally:
            self._release(permit)

    def on_success(self, permit: Permit) -> None:
        """A request succeeded: correct the TPM estimate and grow the window a little."""
        if self._tpm is not None and permit.used_tokens is not None:
            surplus = permit.estimated_tokens - permit.used_tokens
            if surplus > 0:
                self._tpm.give_back(surplus)
            else:
                self._tpm.take(-surplus)
        if self.window < self.ceiling:
            self.window = min(float(self.ceiling), self.window + 1.0 / self.window)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: pause every worker for `retry_after` and halve the window (once per cooldown)."""
        now = self.clock()
        self.rate_limited += 1
        wait = retry_after if retry_after is not None and retry_after > 0 else 1.0
        self.pause_until = max(self.pause_until, now + wait)
        # A burst of 429s answers one overload; cut once for it, not once per reply.
        if now >= self._last_cut:
            self.window = max(1.0, self.window / 2)
            self._last_cut = self.pause_until
        self._freed.set()

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Use `x-ratelimit-*` headers of a reply: learn the provider's limits, slow down before a 429."""
        del headers  # refined with the rate-limit work; the slot already honours 429s

    async def _acquire(self, estimated_tokens: int) -> Permit:
        async with self._turn:
            while True:
                while self.in_flight >= self.limit:
                    self._freed.clear()
                    await self._freed.wait()
                wait = self._time_gate(estimated_tokens)
                if wait <= 1e-6:
                    break
                await self.sleep(wait)
            if self._rpm is not None:
                self._rpm.take(1)
            if self._tpm is not None:
                self._tpm.take(estimated_tokens)
            self.in_flight += 1
            return Permit(estimated_tokens=estimated_tokens, started=self.clock())

    def _time_gate(self, estimated_tokens: int) -> float:
        wait = self.pause_until - self.clock()
        if self._rpm is not None:
            wait = max(wait, self._rpm.delay(1))
        if self._tpm is not None:
            wait = max(wait, self._tpm.delay(estimated_tokens))
        return wait

    def _release(self, permit: Permit) -> None:
        del permit
        self.in_flight -= 1
        self._freed.set()
