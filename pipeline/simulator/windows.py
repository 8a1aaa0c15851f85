"""The simulator's rate limits: sliding 60-second windows on an injectable clock, and their headers."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

Clock = Callable[[], float]

_ORG: Final = "org-simulator"
_LIMITS_URL: Final = "Visit https://platform.openai.com/account/rate-limits to learn more."


class RateWindow:
    """Units (requests or tokens) spent in the last `period` seconds, checked against `limit`.

    `clock` returns monotonic seconds; tests pass a fake one so they never sleep.
    """

    __slots__ = ("_clock", "_log", "_used", "limit", "period")

    def __init__(self, limit: int, *, period: float = 60.0, clock: Clock = time.monotonic) -> None:
        if limit < 1:
            raise ValueError(f"a rate limit must be at least 1, got {limit}")
        self.limit = limit
        self.period = period
        self._clock = clock
        self._log: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.period
        log = self._log
        while log and log[0][0] <= horizon:
            self._used -= log.popleft()[1]

    def used(self) -> int:
        """Units spent inside the window right now."""
        self._expire(self._clock())
        return self._used

    def remaining(self) -> int:
        """Units that still fit inside the window right now."""
        return max(0, self.limit - self.used())

    def wait(self, cost: int) -> float:
        """Seconds until `cost` more units fit: 0.0 if they fit now, inf if they never can."""
        if cost > self.limit:
            return math.inf
        now = self._clock()
        self._expire(now)
        excess = self._used + cost - self.limit
        if excess <= 0:
            return 0.0
        # Walk from the oldest use: capacity comes back in the order it was spent.
        freed = 0
        for spent_at, units in self._log:
            freed += units
            if freed >= excess:
                return spent_at + self.period - now
        return self.period  # pragma: no cover - cost <= limit means the log always frees enough

    def add(self, cost: int) -> None:
        """Spend `cost` units now (call only after `wait(cost)` returned 0)."""
        now = self._clock()
        self._expire(now)
        self._log.append((now, cost))
        self._used += cost

    def clear(self) -> None:
        """Forget every use, as if the window had just been created."""
        self._log.clear()
        self._used = 0


def format_duration(seconds: float) -> str:
    """Format a wait the way OpenAI's `x-ratelimit-reset-*` headers do: "120ms", "1.5s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    # Round up to the millisecond so a client that waits exactly this long finds room.
    millis = math.ceil(seconds * 1000 - 1e-6)
    if millis < 1000:
        return f"{millis}ms"
    minutes, millis = divmod(millis, 60_000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request must wait: which window is full and for how long (inf: it can never fit)."""

    dimension: str
    limit: int
    used: int
    requested: int
    wait: float

    def message(self, model: str) -> str:
        """The 429 message the real API sends for this refusal."""
        unit = "TPM" if self.dimension == "tokens" else "RPM"
        where = f"for {model} in organization {_ORG} on {self.dimension} per min ({unit})"
        if math.isinf(self.wait):
            return (
                f"Request too large {where}: Limit {self.limit}, Requested {self.requested}. "
                f"The input or output tokens must be reduced in order to run successfully. {_LIMITS_URL}"
            )
        return (
            f"Rate limit reached {where}: Limit {self.limit}, Used {self.used}, Requested {self.requested}. "
            f"Please try again in {format_duration(self.wait)}. {_LIMITS_URL}"
        )


class RateLimits:
    """A provider's per-minute request and token windows, and the headers that describe them.

    As strict as OpenAI documents its own limits: a refused request still counts against the minute (retrying
    at once only digs deeper), and the request limit also holds over every `quantum` seconds at its per-minute
    rate (600 RPM admits at most 10 requests in any second, not 600 in the first).
    """

    __slots__ = ("headers", "per_minute", "requests", "short", "tokens")

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        clock: Clock = time.monotonic,
        window_seconds: float = 60.0,
        quantum: float = 1.0,
        headers: str = "full",
    ) -> None:
        # A shorter window holds a proportional share of the per-minute limit; headers stay per minute.
        share = window_seconds / 60.0
        self.per_minute = 1 / share
        self.headers = headers
        self.requests = RateWindow(max(1, round(rpm * share)), period=window_seconds, clock=clock) if rpm else None
        self.tokens = RateWindow(max(1, round(tpm * share)), period=window_seconds, clock=clock) if tpm else None
        self.short = None
        if rpm and quantum > 0:
            self.short = RateWindow(max(1, round(rpm * quantum / 60)), period=quantum, clock=clock)

    def _request_wait(self) -> float:
        waits = [w.wait(1) for w in (self.requests, self.short) if w is not None]
        return max(waits, default=0.0)

    def spend(self, cost: int, headers: dict[str, str]) -> Refusal | None:
        """Spend one request and `cost` tokens, or refuse (the refused request still counts).

        Adds the x-ratelimit-* headers of each configured window to `headers` (unless this provider sends
        fewer headers), and on a refusal that can end, retry-after-ms (exact) and retry-after (whole seconds,
        at least 1).
        """
        requests, tokens, short = self.requests, self.tokens, self.short
        if requests is None and tokens is None:
            return None
        wait_requests = self._request_wait()
        wait_tokens = tokens.wait(cost) if tokens is not None else 0.0
        refusal = None
        if wait_tokens > wait_requests and tokens is not None:
            refusal = Refusal("tokens", tokens.limit, tokens.used(), cost, wait_tokens)
        elif wait_requests and requests is not None:
            binding = short if short is not None and short.wait(1) >= wait_requests else requests
            refusal = Refusal("requests", binding.limit, binding.used(), 1, wait_requests)
        elif tokens is not None:
            tokens.add(cost)
        for window in (requests, short):
            if window is not None:
                window.add(1)  # refused or not: the provider counts every request it receives
        if refusal is not None and not math.isinf(refusal.wait):
            refusal = Refusal(refusal.dimension, refusal.limit, refusal.used, refusal.requested, self._retry_wait(cost))
        self._describe(cost, refusal, headers)
        return refusal

    def _retry_wait(self, cost: int) -> float:
        wait = self._request_wait()
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait(cost))
        return wait

    def _describe(self, cost: int, refusal: Refusal | None, headers: dict[str, str]) -> None:
        requests, tokens = self.requests, self.tokens
        if self.headers == "full":
            # reset-*: how long until a request like this one fits again ("0s": it fits now).
            scale = self.per_minute
            if requests is not None:
                headers["x-ratelimit-limit-requests"] = str(round(requests.limit * scale))
                headers["x-ratelimit-remaining-requests"] = str(round(requests.remaining() * scale))
                headers["x-ratelimit-reset-requests"] = format_duration(self._request_wait())
            if tokens is not None:
                headers["x-ratelimit-limit-tokens"] = str(round(tokens.limit * scale))
                headers["x-ratelimit-remaining-tokens"] = str(round(tokens.remaining() * scale))
                headers["x-ratelimit-reset-tokens"] = format_duration(min(tokens.wait(cost), tokens.period))
        if refusal is not None and not math.isinf(refusal.wait) and self.headers != "none":
            headers["retry-after-ms"] = str(math.ceil(refusal.wait * 1000))
            headers["retry-after"] = str(max(1, math.ceil(refusal.wait)))

    def usage(self) -> dict[str, int | None]:
        """Limits and current use of both windows (None where no limit is set)."""
        requests, tokens = self.requests, self.tokens
        return {
            "rpm": requests.limit if requests else None,
            "requests": requests.used() if requests else None,
            "tpm": tokens.limit if tokens else None,
            "tokens": tokens.used() if tokens else None,
        }
