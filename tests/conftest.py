"""Shared fixtures: one OpenAI-compatible simulator for the whole session, reset before each test."""

from __future__ import annotations

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
