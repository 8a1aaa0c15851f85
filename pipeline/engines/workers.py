"""The run's workers: as many as the limiter's window can use, each taking rows from one bounded queue.

A worker is one coroutine that labels one row at a time, so the number of workers caps the requests in
flight. Starting the ceiling's worth at once (thousands, under `--concurrency auto`) would hold thousands of
rows and coroutines for a window that may never grow that far; the pool starts small and adds workers as the
window grows, and stops adding once the input has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

Work = Callable[[], Coroutine[Any, Any, None]]


class WorkerPool:
    """Workers started in a TaskGroup on demand, up to `ceiling`; closed once no more may start."""

    def __init__(self, group: asyncio.TaskGroup, work: Work, *, ceiling: int) -> None:
        self._group = group
        self._work = work
        self.ceiling = ceiling
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.changed = asyncio.Event()  # set when the window grew (see `grew`) or the pool closed
        self.on_close: Callable[[], None] | None = None  # told once the input has ended (the client hedges then)

    def ensure(self, wanted: int) -> None:
        """Have at least `wanted` workers (never more than the ceiling, none once closed)."""
        if self.closed:
            return
        while len(self.tasks) < min(wanted, self.ceiling):
            self.tasks.append(self._group.create_task(self._work()))

    def grew(self) -> None:
        """The limiter's window grew: the staffing loop may add workers."""
        self.changed.set()

    def close(self) -> int:
        """Start no more workers; return how many there are (each needs its own end-of-input sentinel)."""
        if not self.closed and self.on_close is not None:
            self.on_close()
        self.closed = True
        self.changed.set()
        return len(self.tasks)

    async def wait(self) -> None:
        """Return once the pool is closed and every worker has ended (normally or cancelled)."""
        while not self.closed:
            await self.changed.wait()
        if self.tasks:
            await asyncio.wait(self.tasks)

    def cancel(self) -> None:
        """Close the pool and cancel every worker."""
        self.on_close = None  # its rows are abandoned, not hedged
        self.close()
        for task in self.tasks:
            task.cancel()


async def keep_pool_sized(pool: WorkerPool, limit: Callable[[], int]) -> None:
    """Keep the pool a little larger than the window (workers between rows hold no slot) until it closes."""
    while not pool.closed:
        pool.changed.clear()
        wanted = limit()
        pool.ensure(wanted + max(4, wanted // 8))
        await pool.changed.wait()
