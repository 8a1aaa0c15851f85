"""A self-hosted server's engine: a fixed number of slots, a FIFO queue in front of them, and batching cost.

vLLM (and TGI, llama.cpp's server) run at most `max_num_seqs` sequences at once and queue the rest, unbounded,
first come first served; each decoding step serves every running sequence, so a request takes longer the more
sequences share the step. With `slots` set, a chat request waits here for a free slot and then holds it for
its latency × (1 + slot_cost × busy / slots), busy counted as it starts (with itself). Throughput therefore
grows with the load up to `slots` requests in flight and stays flat beyond (the knee), while the latency
climbs with the queue: what a client that sends more than the server can run at once sees.

The queue is unbounded, as vLLM's is; a client that gives up leaves it (its handler is cancelled).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Slots:
    """At most `capacity` holders at once (None: no limit); waiters are served in arrival order."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.busy = 0
        self.max_queued = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def resize(self, capacity: int | None) -> None:
        """Change the number of slots; waiters get the slots a larger capacity frees at once."""
        self.capacity = capacity
        self._wake()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[int]:
        """Wait for a slot in FIFO order and hold it; yields how many slots are busy, this one included."""
        if self.capacity is not None and (self.busy >= self.capacity or self._waiters):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.max_queued = max(self.max_queued, len(self._waiters))
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self.busy -= 1  # the slot was handed over just as the client left: pass it on
                    self._wake()
                raise
        else:
            self.busy += 1
        try:
            yield self.busy
        finally:
            self.busy -= 1
            self._wake()

    def usage(self) -> dict[str, int | None]:
        """Slots, busy slots and the queue, for /stats."""
        return {"slots": self.capacity, "busy": self.busy, "queued": self.queued, "max_queued": self.max_queued}

    def clear_max(self) -> None:
        """Restart the queue's high-water mark (stats reset)."""
        self.max_queued = len(self._waiters)

    def _wake(self) -> None:
        """Hand free slots to the longest waiters (the slot is taken for them before they run)."""
        while self._waiters and (self.capacity is None or self.busy < self.capacity):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)
