"""Shared fixtures: one OpenAI-compatible simulator for the whole session, reset before each test."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pipeline.simulator import SimulatorConfig, SimulatorThread


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    """The session's simulator on 127.0.0.1, with no latency; prefer `sim`, which resets it."""
    with SimulatorThread(SimulatorConfig(latency_ms=0)) as running:
        yield running


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    """The session's simulator with fresh stats, no scripted faults, empty windows and its starting config."""
    simulator.reset()
    return simulator


@pytest.fixture(autouse=True)
def _no_collector_pauses_in_wallclock_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """A wallclock test measures rates and latencies through the simulator, which runs on a thread of this pytest
    process; by the end of the session that process holds millions of objects, and a full garbage collection
    over them stalls the simulator for a few hundred milliseconds: long enough to hand a run paced at 97% of a
    1-second limit requests that arrive "together". Freezing the heap the earlier tests left (`gc.freeze`) keeps
    those pauses out of the measurement; the run's own garbage is still collected."""
    if request.node.get_closest_marker("wallclock") is None:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
