"""A self-hosted server over HTTP: the simulator's slots queue requests, and auto concurrency stays near them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pipeline.ratelimit.limiter import LimitSettings
from pipeline.simulator.slots import Slots

from .helpers import ids_once, label, reviews, write_csv


def test_slots_serve_at_most_their_number_at_once_and_the_rest_in_arrival_order() -> None:
    """Two slots, five holders: two run at once, the others wait and get a slot first come first served; a waiter
    that gives up leaves the queue without taking a slot."""
    slots = Slots(2)
    order: list[int] = []
    release = asyncio.Event()

    async def holder(i: int) -> None:
        async with slots.hold() as busy:
            assert busy <= 2
            order.append(i)
            await release.wait()

    async def main() -> None:
        tasks = [asyncio.create_task(holder(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert order == [0, 1] and slots.queued == 3
        tasks[2].cancel()  # the client went away while queued
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert order == [0, 1, 3, 4]
    assert slots.busy == 0 and slots.queued == 0 and slots.max_queued == 3


def test_the_simulator_queues_what_its_slots_cannot_take(sim: Any, tmp_path: Path) -> None:
    """--slots 2 with eight requests in flight: the simulator reports the queue they waited in."""
    sim.configure(slots=2, latency_ms=20)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(40)), out, concurrency=8)
    slots = sim.stats(events=False)["slots"]
    assert summary.exit_code == 0
    assert slots["slots"] == 2 and slots["busy"] == 0 and slots["max_queued"] >= 4


@pytest.mark.wallclock
@pytest.mark.parametrize("gateway", ["none", "litellm"])
def test_auto_concurrency_keeps_in_flight_near_the_slots_without_timeouts(
    sim: Any, tmp_path: Path, gateway: str
) -> None:
    """--concurrency auto against 16 slots at 50 ms, direct or through a LiteLLM-like proxy (no rate headers, no
    429s): every row labeled, at most twice the slots in flight (a crash abandons no more), no timeouts or retries."""
    sim.configure(slots=16, latency_ms=50, rate_headers="none", gateway=gateway)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(1500)), out, limits=LimitSettings.automatic())
    stats = sim.stats(events=False)
    assert summary.exit_code == 0 and len(ids_once(out)) == 1500
    assert stats["max_in_flight"] <= 2 * 16
    assert summary.retries == 0 and stats["requests"] == 1500
