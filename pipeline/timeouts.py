"""How long one attempt may take: a multiple of recent replies' p99, not a fixed minute.

A hung request used to hold its slot for the whole `--timeout` (60 s), and the end of a run waited for the
last of them. `AdaptiveTimeout` follows the observed distribution instead: once enough replies have come back,
an attempt is abandoned (and retried) after `MULTIPLE` × the p99 of recent latencies, never sooner than
`FLOOR` seconds and never later than `--timeout`. The rule learns from the run's own model and prompt, so
slow models and long outputs are not cut: their p99 is high too.

Timeouts that come in a cluster are a different signal: a gateway holding requests over its limit (LiteLLM
does, by default, for up to a minute) or a provider drowning. `note_timeout` says when timeouts cluster, so
the client treats them like a 429 (pause, slower pace, no retry used up) rather than as row failures.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

MULTIPLE: Final = 4.0  # abandon an attempt after this many times the recent p99
FLOOR: Final = 2.0  # seconds: never abandon sooner (connection set-up, a GC pause, a busy server)
SAMPLES: Final = 32  # replies needed before the p99 means anything
KEPT: Final = 512  # recent latencies the p99 is taken from
CLUSTER: Final = 3  # at least this many timeouts within one timeout's span...
CLUSTER_SHARE: Final = 0.1  # ...and at least this share of the replies in it read as overload, not bad luck


class AdaptiveTimeout:
    """The per-attempt timeout of one client (one model): see the module docstring."""

    __slots__ = ("_p99", "_recent", "_replied", "_since", "_timeouts", "ceiling")

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self._recent: deque[float] = deque(maxlen=KEPT)
        self._since = 0  # replies since the p99 was last computed
        self._p99: float | None = None
        self._timeouts: deque[float] = deque()
        self._replied: deque[float] = deque()  # when recent replies came back (within one timeout's span)

    @property
    def seconds(self) -> float:
        """The timeout for the next attempt."""
        if self._p99 is None:
            return self.ceiling
        return min(self.ceiling, max(FLOOR, MULTIPLE * self._p99))

    @property
    def p99(self) -> float | None:
        """The 99th percentile of recent reply latencies (None until enough replies have come back)."""
        return self._p99

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

    def note_timeout(self, now: float) -> bool:
        """Count an abandoned attempt; True when timeouts cluster (several, and a tenth of the replies, within
        one timeout's span)."""
        self._timeouts.append(now)
        self._trim(self._timeouts, now)
        self._trim(self._replied, now)
        timeouts = len(self._timeouts)
        return timeouts >= CLUSTER and timeouts >= CLUSTER_SHARE * (timeouts + len(self._replied))

    def _trim(self, times: deque[float], now: float) -> None:
        span = self.seconds
        while times and times[0] < now - span:
            times.popleft()
