"""How long one attempt may take: a multiple of recent replies' p99, not a fixed minute.

A hung request used to hold its slot for the whole `--timeout` (60 s), and the end of a run waited for the
last of them. `AdaptiveTimeout` follows the observed distribution instead: once enough replies have come back,
an attempt is abandoned (and retried) after `MULTIPLE` × the p99 of recent latencies, never sooner than
`FLOOR` seconds and never later than `--timeout`. The rule learns from the run's own model and prompt, so
slow models and long outputs are not cut: their p99 is high too.

The rule holds for attempts already in flight: each one runs under a `Deadline` that the timeout keeps in a
registry, and when the timeout changes every live deadline moves to its start + the new timeout. A request
sent in the first second, before anything was learned, is abandoned at its start + the learned timeout, not
after the 60 s ceiling. The deadlines in flight move only when the timeout has moved by more than `MOVE` (a
share of it) since they last moved, so thousands of attempts in flight are walked over rarely, not every time
the p99 is taken; meanwhile they end within a tenth of the current timeout.

Timeouts that come in a cluster are a different signal: a gateway holding requests over its limit (LiteLLM
1.108.7 does, by default, for up to ~180 s) or a provider drowning. `note_timeout` says when timeouts cluster, so
the client treats them like a 429 (pause, slower pace, no retry used up) rather than as row failures.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from types import TracebackType
from typing import Final

MULTIPLE: Final = 4.0  # abandon an attempt after this many times the recent p99
FLOOR: Final = 2.0  # seconds: never abandon sooner (connection set-up, a GC pause, a busy server)
SAMPLES: Final = 32  # replies needed before the p99 means anything
KEPT: Final = 512  # recent latencies the p99 is taken from
MOVE: Final = 0.1  # live deadlines move only when the timeout moved by more than this share: rarely
CLUSTER: Final = 3  # at least this many timeouts within one timeout's span...
CLUSTER_SHARE: Final = 0.1  # ...and at least this share of the replies in it read as overload, not bad luck


class AdaptiveTimeout:
    """The per-attempt timeout of one client (one model): see the module docstring."""

    __slots__ = ("_live", "_moved", "_p99", "_recent", "_replied", "_seconds", "_since", "_timeouts", "ceiling")

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self._seconds = ceiling
        self._moved = ceiling  # the timeout the deadlines in flight last moved to
        self._recent: deque[float] = deque(maxlen=KEPT)
        self._since = 0  # replies since the p99 was last computed
        self._p99: float | None = None
        self._timeouts: deque[float] = deque()
        self._replied: deque[float] = deque()  # when recent replies came back (within one timeout's span)
        self._live: set[Deadline] = set()  # deadlines of the attempts in flight

    @property
    def seconds(self) -> float:
        """The timeout of the next attempt (those in flight follow it to within a tenth)."""
        return self._seconds

    @property
    def p99(self) -> float | None:
        """The 99th percentile of recent reply latencies (None until enough replies have come back)."""
        return self._p99

    @property
    def live(self) -> frozenset[Deadline]:
        """The deadlines of the attempts in flight now."""
        return frozenset(self._live)

    def note_reply(self, latency: float, now: float) -> None:
        """Fold in one reply's latency (seconds), received at `now`."""
        self._replied.append(now)
        self._trim(self._replied, now)
        self._recent.append(latency)
        self._since += 1
        if len(self._recent) >= SAMPLES and (self._p99 is None or self._since >= SAMPLES):
            ordered = sorted(self._recent)
            self._p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
            self._since = 0
            self._follow(min(self.ceiling, max(FLOOR, MULTIPLE * self._p99)))

    def note_timeout(self, now: float) -> bool:
        """Count an abandoned attempt; True when timeouts cluster (several, and a tenth of the replies, within
        one timeout's span)."""
        self._timeouts.append(now)
        self._trim(self._timeouts, now)
        self._trim(self._replied, now)
        timeouts = len(self._timeouts)
        return timeouts >= CLUSTER and timeouts >= CLUSTER_SHARE * (timeouts + len(self._replied))

    def _follow(self, seconds: float) -> None:
        """Take a newly learned timeout; move the deadlines in flight to it if it differs enough from their last."""
        self._seconds = seconds
        if abs(seconds - self._moved) <= MOVE * self._moved:
            return
        self._moved = seconds
        for deadline in self._live:
            deadline.move(seconds)

    def _trim(self, times: deque[float], now: float) -> None:
        span = self._seconds
        while times and times[0] < now - span:
            times.popleft()


class Deadline:
    """The deadline of one attempt: `async with` it around the request; it ends at its start + the timeout,
    whatever the timeout is by then (a `TimeoutError` leaves the block, as with `asyncio.timeout`)."""

    __slots__ = ("_owner", "_timeout", "started")

    def __init__(self, owner: AdaptiveTimeout) -> None:
        self._owner = owner
        self._timeout: asyncio.Timeout | None = None
        self.started = 0.0  # loop time the request started

    @property
    def limit(self) -> float:
        """Seconds this attempt may take (or took, once abandoned)."""
        when = self._timeout.when() if self._timeout is not None else None
        return self._owner.seconds if when is None else when - self.started

    @property
    def active(self) -> bool:
        """Whether the request is under way and has not been abandoned yet."""
        return self._timeout is not None and self in self._owner._live and not self._timeout.expired()

    def move(self, seconds: float) -> None:
        """End the attempt at its start + `seconds` (at once if that has passed)."""
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self.started + seconds)

    def cut(self) -> None:
        """Abandon the attempt now (another copy of it has replied)."""
        if self.active:
            assert self._timeout is not None  # noqa: S101 - active says so
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def __aenter__(self) -> Deadline:
        self.started = asyncio.get_running_loop().time()
        self._timeout = asyncio.timeout_at(self.started + self._owner.seconds)
        await self._timeout.__aenter__()
        self._owner._live.add(self)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._owner._live.discard(self)
        assert self._timeout is not None  # noqa: S101 - entered
        await self._timeout.__aexit__(kind, error, trace)  # turns its own cancellation into TimeoutError
