"""A fleet of servers behind one run (`--base-url` given several times): where the next request goes.

Each request goes to the server with the fewest requests in flight, so a faster server, which finishes
sooner, gets more of them. A server that fails (connection errors, timeouts, 5xx, 429) is left alone
for a while that doubles with each failure in a row (1 s up to 30 s); a server whose replies take more
than three times as long as the fastest server's is left alone for a short while, then probed with one
request. When every server is backed off, the one that comes back first gets the request: the retry's
own backoff does the waiting.

One server is the common case: then the pool only counts, and never backs anything off.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Generic, TypeVar

C = TypeVar("C")

FAIL_BACKOFF: Final = 1.0  # seconds after the first failure in a row; doubles per further failure
MAX_BACKOFF: Final = 30.0
SLOW_FACTOR: Final = 3.0  # slower than this many times the fastest server: backed off
SLOW_BACKOFF: Final = 2.0
_EWMA: Final = 0.2


class Outcome(Enum):
    """What one request told us about its server."""

    OK = "ok"
    FAILED = "failed"  # the server did not answer properly: connection, timeout, 5xx, 429
    NEUTRAL = "neutral"  # it answered, but the answer was unusable or refused: not the server's health


@dataclass(slots=True)
class Endpoint(Generic[C]):
    """One server: its client, its load, its health, and what it did for the run."""

    url: str
    client: C
    in_flight: int = 0
    rows: int = 0
    errors: int = 0
    backoffs: int = 0
    failures_in_a_row: int = 0
    backoff_until: float = 0.0
    latency: float | None = None  # EWMA of reply times (seconds)


class EndpointPool(Generic[C]):
    """Spreads requests over servers by least in flight and backs off the ones that fail or slow down."""

    def __init__(self, endpoints: Sequence[tuple[str, C]], *, clock: Callable[[], float] = time.monotonic) -> None:
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.endpoints = [Endpoint(url, client) for url, client in endpoints]
        self.clock = clock
        self._turn = itertools.count()  # ties go round the fleet, not always to the first server

    @property
    def first(self) -> Endpoint[C]:
        """The first endpoint given (the only one, for a single server)."""
        return self.endpoints[0]

    def pick(self) -> Endpoint[C]:
        """The endpoint for the next request (counted as in flight until `done`)."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            chosen = endpoints[0]
        else:
            now = self.clock()
            ready = [e for e in endpoints if e.backoff_until <= now]
            if not ready:
                ready = [min(endpoints, key=lambda e: e.backoff_until)]
            turn = next(self._turn)
            size = len(endpoints)
            chosen = min(ready, key=lambda e: (e.in_flight, (endpoints.index(e) - turn) % size))
        chosen.in_flight += 1
        return chosen

    def done(self, endpoint: Endpoint[C], outcome: Outcome, latency: float | None = None) -> None:
        """Record how a request on `endpoint` ended (and its reply time, for a success)."""
        endpoint.in_flight -= 1
        if outcome is Outcome.OK:
            endpoint.rows += 1
            endpoint.failures_in_a_row = 0
            if latency is not None:
                self._note_latency(endpoint, latency)
        elif outcome is Outcome.FAILED:
            endpoint.errors += 1
            endpoint.failures_in_a_row += 1
            if len(self.endpoints) > 1:
                wait = min(MAX_BACKOFF, FAIL_BACKOFF * 2 ** (endpoint.failures_in_a_row - 1))
                self._back_off(endpoint, wait)

    def _note_latency(self, endpoint: Endpoint[C], latency: float) -> None:
        if len(self.endpoints) == 1:
            return
        fastest = min((e.latency for e in self.endpoints if e.latency is not None and e is not endpoint), default=None)
        slow = None if fastest is None else SLOW_FACTOR * fastest
        if endpoint.latency is None or (slow is not None and latency <= slow < endpoint.latency):
            endpoint.latency = latency  # a first reply, or a probe showing the server has recovered: believe it
        else:
            endpoint.latency += _EWMA * (latency - endpoint.latency)
        if slow is not None and endpoint.latency > slow:
            self._back_off(endpoint, SLOW_BACKOFF)

    def _back_off(self, endpoint: Endpoint[C], seconds: float) -> None:
        until = self.clock() + seconds
        if until > endpoint.backoff_until:
            endpoint.backoff_until = until
            endpoint.backoffs += 1

    def report(self) -> dict[str, dict[str, int]]:
        """Rows, errors and back-offs per server (the summary's "rows per server")."""
        return {e.url: {"rows": e.rows, "errors": e.errors, "backoffs": e.backoffs} for e in self.endpoints}
