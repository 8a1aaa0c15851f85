"""A fleet of servers (`--base-url` several times): least in flight, back-off of failing or slow servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.endpoints import FAIL_BACKOFF, MAX_BACKOFF, SLOW_BACKOFF, Endpoint, EndpointPool, Outcome
from pipeline.simulator import SimulatorConfig, SimulatorThread

from .helpers import cli, label, reviews, sink_ids, write_csv


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool(n: int, clock: Clock) -> EndpointPool[str]:
    return EndpointPool([(f"http://s{i}", f"client{i}") for i in range(n)], clock=clock)


def take(endpoint: Endpoint[str]) -> Endpoint[str]:
    """Send a request to this endpoint, whatever the pool would pick (to set up a scene)."""
    endpoint.in_flight += 1
    return endpoint


def test_requests_go_to_the_server_with_the_fewest_in_flight() -> None:
    """Ties go round the fleet; a server that keeps requests longer gets fewer new ones."""
    fleet = pool(3, Clock())
    first = [fleet.pick().url for _ in range(3)]
    assert sorted(first) == ["http://s0", "http://s1", "http://s2"]
    by_url = {e.url: e for e in fleet.endpoints}
    fleet.done(by_url["http://s1"], Outcome.OK, 0.1)
    fleet.done(by_url["http://s2"], Outcome.OK, 0.1)
    assert fleet.pick().url in {"http://s1", "http://s2"}
    assert fleet.pick().url in {"http://s1", "http://s2"}
    assert [e.in_flight for e in fleet.endpoints] == [1, 1, 1]


def test_a_failing_server_is_backed_off_longer_each_time_and_comes_back() -> None:
    """Failures in a row back a server off for 1, 2, 4 … s (capped); a success resets it."""
    clock = Clock()
    fleet = pool(2, clock)
    bad = fleet.endpoints[0]
    waits = []
    for _ in range(7):
        fleet.done(take(bad), Outcome.FAILED)
        waits.append(bad.backoff_until - clock.now)
    assert waits == [FAIL_BACKOFF * 2**i for i in range(5)] + [MAX_BACKOFF, MAX_BACKOFF]
    assert {fleet.pick().url for _ in range(4)} == {"http://s1"}  # while backed off, only the other one
    clock.now += MAX_BACKOFF
    fleet.done(take(bad), Outcome.OK, 0.05)
    # Seven failures; the seventh did not push the (capped) back-off any further, so six back-offs.
    assert bad.failures_in_a_row == 0 and bad.errors == 7 and bad.backoffs == 6


def test_a_slow_server_is_backed_off_and_probed_back() -> None:
    """A server 3× slower than the fastest is left alone for a while; a fast probe brings it back at once."""
    clock = Clock()
    fleet = pool(2, clock)
    fast, slow = fleet.endpoints
    fleet.done(take(fast), Outcome.OK, 0.1)
    fleet.done(take(slow), Outcome.OK, 0.5)
    assert slow.backoff_until == pytest.approx(SLOW_BACKOFF)
    assert fleet.pick() is fast
    clock.now += SLOW_BACKOFF
    fleet.done(take(slow), Outcome.OK, 0.12)
    assert slow.latency == pytest.approx(0.12) and slow.backoff_until <= clock.now


def test_when_every_server_is_backed_off_the_first_back_gets_the_request() -> None:
    """No server is ever refused outright: the retry's own backoff does the waiting."""
    clock = Clock()
    fleet = pool(2, clock)
    for endpoint, failures in zip(fleet.endpoints, (3, 1), strict=True):
        for _ in range(failures):
            fleet.done(take(endpoint), Outcome.FAILED)
    assert fleet.pick() is fleet.endpoints[1]


def test_neutral_outcomes_and_a_single_server_change_nothing() -> None:
    """An unusable reply says nothing of the server; one server alone is never backed off."""
    clock = Clock()
    one = pool(1, clock)
    for _ in range(5):
        one.done(one.pick(), Outcome.FAILED)
    assert one.first.backoff_until == 0 and one.first.errors == 5
    fleet = pool(2, clock)
    fleet.done(take(fleet.endpoints[0]), Outcome.NEUTRAL)
    assert fleet.endpoints[0].backoff_until == 0 and fleet.endpoints[0].errors == 0


@pytest.fixture
def second() -> Iterator[SimulatorThread]:
    """A second simulator: the other server of a fleet of two."""
    with SimulatorThread(SimulatorConfig(latency_ms=0)) as running:
        yield running


@pytest.mark.wallclock
def test_a_fleet_shares_the_rows_and_the_summary_counts_them(sim: Any, second: SimulatorThread, tmp_path: Path) -> None:
    """Two equal servers each get a fair part of the rows; the summary shows rows per server."""
    sim.configure(latency_ms=20)
    second.configure(latency_ms=20)
    rows = reviews(400)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), out, base_url=(sim.base_url, second.base_url))
    assert summary.exit_code == 0 and sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    served = [sim.stats()["completed_ok"], second.stats()["completed_ok"]]
    assert sum(served) == 400 and min(served) > 120, served
    by_server = {url: counts["rows"] for url, counts in summary.servers.items()}
    assert by_server == {sim.base_url: served[0], second.base_url: served[1]}
    assert "rows per server:" in summary.render()


def test_a_failing_server_is_avoided_and_no_row_is_lost(sim: Any, second: SimulatorThread, tmp_path: Path) -> None:
    """One server answers every request with 500: its rows are retried on the other, and it gets few requests."""
    second.configure(error_rate=1.0)
    rows = reviews(300)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), out, base_url=(sim.base_url, second.base_url))
    assert summary.exit_code == 0 and sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    assert sim.stats()["completed_ok"] == 300
    assert second.stats()["requests"] <= 40  # the first few while it was still trusted, then a probe now and then
    assert summary.servers[second.base_url]["errors"] == second.stats()["requests"]
    assert "errors, backed off" in summary.render()


@pytest.mark.wallclock
def test_a_slow_server_gets_fewer_rows(sim: Any, second: SimulatorThread, tmp_path: Path) -> None:
    """A server ten times slower than the other gets a small part of the rows."""
    sim.configure(latency_ms=10)
    second.configure(latency_ms=100)
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "in.csv", reviews(400)), out, base_url=(sim.base_url, second.base_url))
    fast, slow = sim.stats()["completed_ok"], second.stats()["completed_ok"]
    assert fast + slow == 400 and slow < 0.2 * 400, (fast, slow)


def test_base_url_given_twice_on_the_command_line(sim: Any, second: SimulatorThread, tmp_path: Path) -> None:
    """`--base-url A --base-url B` spreads one CLI run over both servers."""
    source = write_csv(tmp_path / "in.csv", reviews(100))
    out = tmp_path / "out.jsonl"
    result = cli(
        "label", "--input", str(source), "--output", str(out), "--no-progress", "--concurrency", "8",
        "--base-url", sim.base_url, "--base-url", second.base_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sim.stats()["completed_ok"] > 0 and second.stats()["completed_ok"] > 0
    assert "rows per server:" in result.stderr
