"""A whole run against a rate-limited provider in virtual time: the real `Limiter` and the simulator's real windows.

The event loop's clock only moves when every coroutine waits (its selector jumps to the next timer), so minutes
of traffic against a 60 s window take a fraction of a second and nothing sleeps. What it leaves out on purpose:
HTTP, the SDK and the sink; the limiter and the provider's windows are the code under test.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.ratelimit.limiter import Limiter, LimitSettings
from pipeline.simulator.windows import RateLimits

# A refusal comes back faster than a reply: the provider answers it before any model runs.
REFUSAL_SECONDS = 0.005


class _JumpingSelector(selectors.SelectSelector):
    """Never waits: a select with a timeout moves the virtual clock to the end of it."""

    def __init__(self, clock: VirtualLoop) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("every coroutine waits for something that no timer will bring: a deadlock")
        self._clock.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` is virtual and jumps from timer to timer."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


@dataclass
class Outcome:
    """What a virtual run did: when each request arrived and whether it was admitted."""

    rpm: int
    elapsed: float = 0.0
    admitted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    @property
    def refused_share(self) -> float:
        """429s ÷ all requests."""
        return len(self.refused) / max(1, len(self.refused) + len(self.admitted))

    @property
    def goodput(self) -> float:
        """Admitted requests per second over the whole run ÷ the limit's rate."""
        return len(self.admitted) / self.elapsed / (self.rpm / 60)

    def admitted_between(self, start: float, end: float) -> int:
        """Requests admitted with arrival in [start, end)."""
        return sum(1 for t in self.admitted if start <= t < end)


def run_against(
    rpm: int,
    *,
    window_seconds: float,
    quantum: float,
    rows: int,
    latency: float = 0.2,
    settings: LimitSettings | None = None,
    prepare: Callable[[Limiter], Any] | None = None,
) -> Outcome:
    """Label `rows` rows through a `Limiter` against a provider that says nothing but a bare 429.

    Replies take `latency` ± 20% (seeded), so that requests do not all leave at the same instant as they would
    if every reply came back together.
    """
    loop = VirtualLoop()
    jitter = random.Random(7)
    outcome = Outcome(rpm=rpm)
    provider = RateLimits(rpm, None, clock=loop.time, window_seconds=window_seconds, quantum=quantum, headers="none")

    async def main() -> None:
        limiter = Limiter(settings or LimitSettings.automatic(), clock=loop.time)
        if prepare is not None:
            prepare(limiter)
        todo = rows

        async def worker() -> None:
            nonlocal todo
            while todo > 0:
                todo -= 1
                while not await attempt(limiter):
                    pass

        async def attempt(limiter: Limiter) -> bool:
            async with limiter.slot(1) as permit:
                if provider.spend(1, {}) is not None:
                    outcome.refused.append(loop.now)
                    await asyncio.sleep(REFUSAL_SECONDS)
                    limiter.on_rate_limited(None)
                    return False
                outcome.admitted.append(loop.now)
                await asyncio.sleep(latency * jitter.uniform(0.8, 1.2))
                limiter.on_success(permit)
                return True

        # More workers than the window will hold: the limiter, not the staffing, decides what is in flight.
        workers = min(rows, max(50, round(rpm / 60 * latency * 4)))
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())
        outcome.elapsed = loop.now

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return outcome
