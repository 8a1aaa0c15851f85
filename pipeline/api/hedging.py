"""The last stragglers of a run get a second copy; the first reply wins.

Near the end of a run a single hung request decides the wall time: everything else is done, and that one
waits for its timeout (at least `timeouts.FLOOR`, more for slow models) before it is even retried. Once the
input has ended (the reader is done, the queue drains) and few requests remain in flight, an attempt that has
run for `MULTIPLE` × the recent p99 (and at least `FLOOR` seconds) gets a copy, sent while the run has room for
it (the window is not full and the rate limits allow a request now). Whichever replies first is the row's
result; the other is cancelled. A row is still written once: the copy is part of the same attempt, which
returns one result. The copy is a request like any other: its tokens count, and `CallStats.hedged` counts it;
under `--max-cost` it holds its worst case like any request, and is not sent when the budget cannot cover it.

Why these numbers: 3 × p99 is past all but a few of the replies in a thousand, so a copy is sent for a
request that is almost surely stuck, not slow; the half-second floor keeps fast servers (a p99 of 20 ms) from
copying requests held up by a GC pause or a connection set-up, where the copy would cost a request to save
less than a blink. Hedging runs only at the end and only for a few rows, so it costs a handful of requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

from pipeline.api.timeouts import AdaptiveTimeout, Deadline
from pipeline.ratelimit.limiter import Limiter
from pipeline.results import Labeled, Row
from pipeline.stats import CallStats

MULTIPLE: Final = 3.0  # hedge an attempt once it has taken this many times the recent p99...
FLOOR: Final = 0.5  # ...and at least this many seconds
FEW: Final = 0.25  # "few in flight": at most this share of the window
CHECKS: Final = 4  # look for stragglers this many times per hedging delay


class Attempt(Deadline):
    """One attempt at a row: its deadline, and the copy the hedger may send of it."""

    __slots__ = ("copy", "estimate", "max_tokens", "number", "original", "row", "won")

    def __init__(
        self,
        timeouts: AdaptiveTimeout,
        row: Row,
        estimate: int,
        number: int,
        original: Attempt | None = None,
        *,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__(timeouts)
        self.row, self.estimate, self.number = row, estimate, number
        self.max_tokens = max_tokens  # the request's, when not the task's (a retry of a reply cut off at it)
        self.original = original  # set on a copy: copies are not copied again
        self.copy: asyncio.Task[Labeled] | None = None
        self.won: Labeled | None = None  # the copy's result, when it replied first


Send = Callable[[Attempt], Coroutine[Any, Any, Labeled]]


class Purse(Protocol):
    """What a copy may spend (`run.budget.Budget` under --max-cost)."""

    def reserve(self, text: str, *, max_tokens: int | None = None, stop: bool = True) -> float | None: ...

    def settle(self, held: float) -> None: ...


class Hedger:
    """Sends copies of a run's last stragglers (see the module docstring); idle until `input_ended`."""

    def __init__(self, timeouts: AdaptiveTimeout, limiter: Limiter, stats: CallStats, send: Send) -> None:
        self.timeouts = timeouts
        self.limiter = limiter
        self.stats = stats
        self._send = send
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ended = False  # the input has ended: only then are late attempts stragglers
        self.budget: Purse | None = None  # --max-cost: a copy holds its worst case too, or is not sent

    def input_ended(self) -> None:
        """No more rows will come: from now on, look for stragglers."""
        self._ended = True
        if self._timer is None and not self._closed:
            self._tick()

    def close(self) -> None:
        """Stop looking (the run is over)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def delay(self) -> float | None:
        """How long an attempt runs before it is a straggler (None until the p99 is known)."""
        p99 = self.timeouts.p99
        return None if p99 is None else max(FLOOR, MULTIPLE * p99)

    def check(self) -> None:
        """Copy the stragglers the run has room for now (the timer looks a fraction of the delay apart)."""
        delay = self.delay()
        limiter = self.limiter
        if not self._ended or delay is None or limiter.in_flight > FEW * limiter.limit:
            return
        now = asyncio.get_running_loop().time()
        sent = 0
        for attempt in sorted(self.timeouts.live, key=lambda a: a.started):
            if not isinstance(attempt, Attempt) or attempt.original is not None or attempt.copy is not None:
                continue
            if now - attempt.started < delay:
                break  # the oldest come first: the rest are younger still
            if limiter.in_flight + sent >= limiter.limit or not limiter.has_room(attempt.estimate):
                break
            held = 0.0
            if self.budget is not None:
                reserved = self.budget.reserve(attempt.row.text, max_tokens=attempt.max_tokens, stop=False)
                if reserved is None:
                    break  # the budget cannot cover a copy; the original runs on, and the run goes on
                held = reserved
            self._launch(attempt, held)
            sent += 1

    def _tick(self) -> None:
        self.check()
        self._timer = asyncio.get_running_loop().call_later((self.delay() or FLOOR) / CHECKS, self._tick)

    def _launch(self, attempt: Attempt, held: float) -> None:
        copy = Attempt(
            self.timeouts,
            attempt.row,
            attempt.estimate,
            attempt.number,
            original=attempt,
            max_tokens=attempt.max_tokens,
        )
        attempt.copy = asyncio.get_running_loop().create_task(self._send(copy))
        attempt.copy.add_done_callback(lambda task: _replied(attempt, task))
        if self.budget is not None:
            settle = self.budget.settle  # once the copy is over, its tokens (or its worst case) are in the spent
            attempt.copy.add_done_callback(lambda _task: settle(held))
        self.stats.hedged += 1

    async def outcome(self, attempt: Attempt) -> Labeled | None:
        """After `attempt` itself failed: the result of its copy, once it is in (None without a copy, or if the
        copy failed too)."""
        if attempt.won is not None:
            return attempt.won
        copy = attempt.copy
        if copy is None:
            return None
        await asyncio.wait([copy])
        return attempt.won

    @staticmethod
    def drop(attempt: Attempt) -> None:
        """The attempt is over: cancel its copy if that is still waiting for a reply."""
        if attempt.copy is not None and not attempt.copy.done():
            attempt.copy.cancel()


def _replied(attempt: Attempt, copy: asyncio.Task[Labeled]) -> None:
    """The copy is done: if it replied, it wins, and the original (if still waiting) is cut."""
    if copy.cancelled() or copy.exception() is not None:
        return  # a failed copy changes nothing: the original runs on under its own deadline
    attempt.won = copy.result()
    attempt.cut()
