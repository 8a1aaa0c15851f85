"""How many requests may be in flight and when the next one may start.

One `Limiter` is shared by all workers of a run. A worker takes a slot right before its HTTP call; the
slot waits for (1) a global pause after a 429 or when the provider says its window is spent, (2) the
requests-per-minute and tokens-per-minute buckets, and (3) the concurrency window.

- Buckets run at 95% of the limits given (`--rpm`, `--tpm`) or learned from `x-ratelimit-limit-*`
  headers, whichever is lower, so the run stays under the provider's limit before the first 429.
- The window starts at 10 and grows like TCP: by one per success (doubling each round trip) until the
  first 429, then by about one per round trip. A 429 pauses everyone for its Retry-After and halves the
  window, once per overload. The window never passes the ceiling: `--concurrency N`, or 256 for auto.
- Auto also watches latency: it stops growing while replies take more than twice the fastest recent
  latency, and shrinks by 10% a round trip when they take more than three times it, so a self-hosted
  server that slows under load is not pushed further.

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
from email.utils import parsedate_to_datetime

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Stay this far under a known limit: the provider's window and ours never line up exactly.
SAFETY = 0.95
AUTO_CEILING = 256
START_WINDOW = 10


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
    rpm: float | None = None
    tpm: float | None = None
    share: float = 1.0

    @classmethod
    def automatic(cls, *, rpm: float | None = None, tpm: float | None = None) -> LimitSettings:
        """`--concurrency auto`: start at 10 and find the level the provider sustains, up to 256."""
        return cls(concurrency=AUTO_CEILING, auto=True, rpm=rpm, tpm=tpm)


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
        self.ceiling = max(1, settings.concurrency)
        self.window = float(min(START_WINDOW, self.ceiling))
        self.threshold = math.inf  # slow start until the first 429
        self.in_flight = 0
        self.pause_until = 0.0
        self.fast_latency: float | None = None  # EWMA of recent latencies (seconds)
        self.base_latency: float | None = None  # the fastest recent level
        self._last_cut = -math.inf
        self._rpm = TokenBucket(settings.rpm * SAFETY, clock) if settings.rpm else None
        self._tpm = TokenBucket(settings.tpm * SAFETY, clock) if settings.tpm else None
        self._turn = asyncio.Lock()  # FIFO: the longest waiter goes first
        self._freed = asyncio.Event()

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return max(1, min(self.ceiling, int(self.window)))

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

    def on_success(self, permit: Permit) -> None:
        """A request succeeded: correct the TPM estimate, note its latency, and maybe grow the window."""
        if self._tpm is not None and permit.used_tokens is not None:
            surplus = permit.estimated_tokens - permit.used_tokens
            if surplus > 0:
                self._tpm.give_back(surplus)
            else:
                self._tpm.take(-surplus)
        now = self.clock()
        self._note_latency(now - permit.started)
        if self.settings.auto and self._slow_replies(now):
            return
        if permit.window_limited and self.window < self.ceiling:
            step = 1.0 if self.window < self.threshold else 1.0 / self.window
            self.window = min(float(self.ceiling), self.window + step)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429 arrived: pause every worker for `retry_after` and halve the window (once per overload)."""
        now = self.clock()
        wait = retry_after if retry_after is not None and retry_after > 0 else 1.0
        self.pause_until = max(self.pause_until, now + wait)
        # A burst of 429s answers one overload; cut once for it, not once per reply.
        if now >= self._last_cut:
            self.window = max(1.0, self.window / 2)
            self.threshold = self.window
            self._last_cut = self.pause_until
        self._freed.set()

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Learn the provider's limits from `x-ratelimit-*` headers and pause when its window is spent."""
        limit_requests = _number(headers.get("x-ratelimit-limit-requests"))
        if limit_requests:
            self._rpm = self._tighten(self._rpm, self.settings.rpm, limit_requests)
        limit_tokens = _number(headers.get("x-ratelimit-limit-tokens"))
        if limit_tokens:
            self._tpm = self._tighten(self._tpm, self.settings.tpm, limit_tokens)
        # Others may share the key: when what is left cannot cover what we have in flight, wait for it.
        remaining = _number(headers.get("x-ratelimit-remaining-requests"))
        if remaining is not None and remaining < self.in_flight:
            self._pause_for(headers.get("x-ratelimit-reset-requests"))

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
            # Grow only when the window is what holds requests back, not the buckets or the input.
            limited = self.in_flight >= self.limit
            return Permit(estimated_tokens=estimated_tokens, started=self.clock(), window_limited=limited)

    def _time_gate(self, estimated_tokens: int) -> float:
        wait = self.pause_until - self.clock()
        if self._rpm is not None:
            wait = max(wait, self._rpm.delay(1))
        if self._tpm is not None:
            wait = max(wait, self._tpm.delay(estimated_tokens))
        return wait

    def _tighten(self, bucket: TokenBucket | None, given: float | None, learned: float) -> TokenBucket:
        per_minute = min(learned, given or math.inf) * SAFETY
        if bucket is None:
            return TokenBucket(per_minute, self.clock)
        if abs(bucket.per_minute - per_minute) > 1e-9:
            bucket.set_rate(per_minute)
        return bucket

    def _pause_for(self, reset: str | None) -> None:
        seconds = parse_duration(reset or "")
        if seconds:
            self.pause_until = max(self.pause_until, self.clock() + seconds)

    def _note_latency(self, latency: float) -> None:
        if self.fast_latency is None or self.base_latency is None:
            self.fast_latency = self.base_latency = latency
            return
        self.fast_latency += 0.2 * (latency - self.fast_latency)
        if self.fast_latency < self.base_latency:
            self.base_latency = self.fast_latency
        else:  # drift up slowly, so a lasting change of the server's speed becomes the new normal
            self.base_latency += 0.002 * (self.fast_latency - self.base_latency)

    def _slow_replies(self, now: float) -> bool:
        """Auto mode: True while latency is well above its base (then the window does not grow)."""
        if self.fast_latency is None or self.base_latency is None or self.base_latency <= 0:
            return False
        ratio = self.fast_latency / self.base_latency
        if ratio > 3.0 and now >= self._last_cut and self.window > START_WINDOW:
            self.window = max(float(START_WINDOW), self.window * 0.9)
            self._last_cut = now + self.fast_latency
        return ratio > 2.0


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for: `retry-after-ms`, `retry-after` (seconds or HTTP date), else `x-ratelimit-reset-*`."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [parse_duration(headers.get(h, "")) for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def parse_duration(text: str) -> float | None:
    """Parse OpenAI's reset durations such as "1s", "6m0s", "120ms", "1h2m3.5s" into seconds."""
    text = text.strip()
    if not text:
        return None
    total, number = 0.0, ""
    i = 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        try:
            total += float(number) * units[unit]
        except ValueError:
            return None
        number = ""
        i += len(unit)
    if number:  # a bare number means seconds
        try:
            total += float(number)
        except ValueError:
            return None
    return total
