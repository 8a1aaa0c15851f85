"""Hung attempts follow the learned timeout, also when sent before it was learned; the last stragglers are hedged."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.hedging import Attempt, Hedger
from pipeline.api.pricing import load_prices
from pipeline.api.timeouts import FLOOR, SAMPLES, AdaptiveTimeout, Deadline
from pipeline.ratelimit.limiter import Limiter, LimitSettings, RetryPolicy
from pipeline.results import Labeled, Row, now_iso
from pipeline.run.budget import Budget
from pipeline.sinks import open_sink
from pipeline.stats import CallStats

from .helpers import label, reviews, sink_ids, write_csv

# A ceiling far above what the tests allow a run to take: reaching it would mean the learned timeout was ignored.
CEILING = 30.0
RETRY = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=CEILING)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run `scenario` on a fresh loop, bounded so that a deadline that never fires fails instead of hanging."""

    async def bounded() -> None:
        async with asyncio.timeout(10):
            await scenario

    asyncio.run(bounded())


def learn(timeouts: AdaptiveTimeout, latency: float, replies: int = SAMPLES) -> None:
    """Feed `replies` replies of `latency` seconds."""
    for i in range(replies):
        timeouts.note_reply(latency, float(i))


def test_a_deadline_in_flight_follows_the_timeout_as_it_is_learned() -> None:
    """An attempt started under the 60 s ceiling ends at its start + the learned timeout once that is known."""

    async def scenario() -> None:
        timeouts = AdaptiveTimeout(60.0)
        async with Deadline(timeouts) as deadline:
            assert deadline.limit == 60.0
            assert timeouts.live == {deadline}
            learn(timeouts, 0.05)
            assert timeouts.seconds == FLOOR
            assert deadline.limit == pytest.approx(FLOOR)
        assert not timeouts.live

    run(scenario())


def test_an_attempt_older_than_the_learned_timeout_is_abandoned_at_once() -> None:
    """A request sent long before the timeout was learned, and older than it, times out as soon as it is learned."""

    async def scenario() -> None:
        timeouts = AdaptiveTimeout(60.0)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            async with Deadline(timeouts) as deadline:
                deadline.started -= 10  # as if sent ten seconds ago, while the ceiling still ruled
                learn(timeouts, 0.05)
                await never

    run(scenario())


def test_small_moves_of_the_p99_leave_the_deadlines_in_flight_alone() -> None:
    """Live deadlines move only when the timeout moved by more than a tenth since they last moved."""

    async def scenario() -> None:
        timeouts = AdaptiveTimeout(60.0)
        learn(timeouts, 1.0)
        assert timeouts.seconds == 4.0
        async with Deadline(timeouts) as deadline:
            learn(timeouts, 1.05)  # 4.2 s: within a tenth of 4 s, so no walk over the attempts in flight
            assert (timeouts.seconds, deadline.limit) == (pytest.approx(4.2), pytest.approx(4.0))
            learn(timeouts, 2.0, replies=64)  # 8 s: followed, also by the attempt in flight
            assert (timeouts.seconds, deadline.limit) == (8.0, pytest.approx(8.0))

    run(scenario())


class Rig:
    """A hedger over one row's attempts, with a window of 8; every copy it sends replies once `reply` is set."""

    def __init__(self) -> None:
        self.timeouts = AdaptiveTimeout(60.0)
        self.limiter = Limiter(LimitSettings(concurrency=8))
        self.stats = CallStats()
        self.row = Row("r1", "review 1: fine", 1)
        self.reply = asyncio.Event()
        self.copies: list[Attempt] = []
        self.hedger = Hedger(self.timeouts, self.limiter, self.stats, self.send)
        learn(self.timeouts, 0.01)  # p99 10 ms: a copy after the 0.5 s floor

    async def send(self, copy: Attempt) -> Labeled:
        self.copies.append(copy)
        await self.reply.wait()
        return Labeled(self.row, "positive", "m", 1, 1, 1.0, copy.number, now_iso())


def test_a_straggler_is_copied_only_at_the_end_when_old_and_few_remain() -> None:
    """No copy before the input ends, while many are in flight or before 3 × p99; then one, and its reply wins."""

    async def scenario() -> None:
        rig = Rig()
        limiter, stats, hedger = rig.limiter, rig.stats, rig.hedger
        original = Attempt(rig.timeouts, rig.row, 10, 1)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            with pytest.raises(TimeoutError):
                async with original:
                    loop = asyncio.get_running_loop()
                    original.started -= 1.0  # 1 s old: twice the hedging delay
                    limiter.in_flight = 1
                    hedger.check()
                    assert stats.hedged == 0, "the input has not ended"
                    limiter.in_flight = 3  # more than a quarter of the window of 8
                    hedger.input_ended()  # looks at once, then on a timer
                    assert stats.hedged == 0, "many still in flight: not the end yet"
                    limiter.in_flight = 1
                    original.started = loop.time() - 0.3
                    hedger.check()
                    assert stats.hedged == 0, "0.3 s old: not a straggler yet"
                    original.started -= 1.0
                    hedger.check()
                    hedger.check()
                    assert stats.hedged == 1, "one copy, once"
                    rig.reply.set()  # the copy replies: the original is cut
                    await never
            assert original.won is not None and original.won.attempts == 1
            assert [c.original for c in rig.copies] == [original]
        finally:
            hedger.close()

    run(scenario())


def test_a_hedge_copy_holds_its_worst_case_in_the_budget_or_is_not_sent() -> None:
    """Under --max-cost a copy reserves its worst case like any request and releases it when it is over; when the
    budget cannot cover it, no copy is sent and the run is not stopped for it."""

    async def scenario() -> None:
        rig = Rig()
        timeouts, limiter, stats, row, hedger = rig.timeouts, rig.limiter, rig.stats, rig.row, rig.hedger
        price = load_prices().price_of("gpt-4o-mini")
        assert price is not None
        worst = price.cost(len(row.text), 100) or 0.0
        hedger.budget = budget = Budget(1.5 * worst, price, len, 100, stats)
        budget.held = worst  # the original's own reservation: room for half a copy only
        original = Attempt(timeouts, row, 10, 1)
        try:
            with pytest.raises(TimeoutError):
                async with original:
                    original.started -= 1.0
                    limiter.in_flight = 1
                    hedger.input_ended()
                    assert (stats.hedged, budget.stopped, budget.held) == (0, False, worst), "no room: no copy"
                    budget.limit = 2.5 * worst
                    hedger.check()
                    assert stats.hedged == 1, "room for a copy now"
                    assert budget.held == pytest.approx(2 * worst), "the copy holds its worst case"
                    rig.reply.set()
                    await asyncio.Event().wait()  # cut by the copy's reply
        finally:
            hedger.close()
        assert original.won is not None
        assert budget.held == pytest.approx(worst), "released once the copy was over"

    run(scenario())


@pytest.mark.wallclock
def test_an_early_hung_request_ends_at_the_learned_timeout(sim: Any, tmp_path: Path) -> None:
    """The run's first request hangs: it is abandoned ~2 s after it was sent (not after --timeout) and retried."""
    sim.configure(latency_ms=25)  # 400 rows through 3 free slots: the input lasts past the learned timeout
    sim.script([{"kind": "hang", "count": 1}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(400)), out, concurrency=4, retry=RETRY)
    assert summary.exit_code == 0, summary.render()
    assert summary.elapsed_s < CEILING / 2, "the hung request kept its --timeout"
    assert summary.hedged == 0, "cut by its deadline, not rescued by a hedge: the input had not ended"
    assert summary.retries == 1
    ids = sink_ids(out)
    assert len(ids) == len(set(ids)) == 400
    assert sorted(r["attempts"] for r in open_sink(out).iter_records())[-2:] == [1, 2]


def test_the_last_straggler_gets_a_copy_and_the_row_is_written_once(sim: Any, tmp_path: Path) -> None:
    """A hung request at the end of the input is hedged: the copy's reply labels the row once, before any timeout."""
    sim.script([{"kind": "hang", "count": 1, "match": "review 98:"}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(100)), out, concurrency=8, retry=RETRY)
    assert summary.exit_code == 0, summary.render()
    assert summary.retries == 0, "the copy replied before the hung request's deadline"
    assert summary.hedged == 1
    assert "1 hedged" in summary.render()
    assert sim.stats(events=False)["requests"] == 101, "one request per row, plus the copy"
    ids = sink_ids(out)
    assert len(ids) == len(set(ids)) == 100
    [record] = [r for r in open_sink(out).iter_records() if r["id"] == "r00098"]
    assert record["attempts"] == 1
