"""Silent providers with windows of any length, on a virtual clock: the real limiter against the simulator's windows."""

from __future__ import annotations

import pytest

from pipeline.ratelimit.limiter import Limiter, LimitSettings, Permit
from pipeline.ratelimit.pacing import CUT

from .test_limits import VirtualClock
from .virtual_provider import run_against


@pytest.mark.parametrize(("rpm", "latency", "window"), [(600, 0.5, 10), (600, 0.2, 60)], ids=["10s", "60s"])
def test_silent_windows_longer_than_a_second_keep_429s_rare_and_goodput_high(
    rpm: int, latency: float, window: int
) -> None:
    """A limit held over any 10 s or 60 s (refused requests counted, no headers, no retry-after): ≤ 2% of requests
    are refused and the run admits ≥ 0.9 of the limit, start to finish (before: 0.63 of the limit over 10 s at
    500 ms replies; 3.2% refused and 0.80 of the limit over 60 s)."""
    outcome = run_against(rpm, window_seconds=window, quantum=0, rows=rpm * 5, latency=latency)
    assert outcome.refused_share <= 0.02
    assert outcome.goodput >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rpm", "latency"),
    [
        (3000, 1.5),
        pytest.param(
            12000,
            3.0,
            marks=pytest.mark.xfail(
                strict=True, reason="open: 0.825 of the limit in five minutes (0.525 before); the ramp (benchmarks.md)"
            ),
        ),
    ],
    ids=["3000rpm-1.5s", "12000rpm-3s"],
)
def test_a_silent_provider_at_high_rates_and_long_latencies_gets_its_limit(rpm: int, latency: float) -> None:
    """The design's target: no headers, a 1 s window, replies taking seconds (±20%), five minutes of rows: auto
    reaches ≥ 0.9 of the limit with ≤ 5% refused (before: 0.83 at 3,000 RPM, 1.5 s: startup took the first reply as
    the baseline and crawled; see docs/benchmarks.md, "A silent provider at high rates")."""
    outcome = run_against(rpm, window_seconds=1, quantum=0, rows=rpm * 5, latency=latency)
    assert outcome.refused_share <= 0.05
    assert outcome.goodput >= 0.9


@pytest.mark.parametrize(("window", "floor"), [(60, 0.684), (10, 0.724)], ids=["60s", "10s"])
def test_a_silent_long_window_at_long_latencies_keeps_429s_rare(window: int, floor: float) -> None:
    """600 RPM over any 10 s or 60 s, replies taking 7 s, no headers: ≤ 2% refused, and no less of the limit than
    before the busiest-second count (silent2: 4.8% and 4.5% refused: at the first 429 the last three seconds'
    replies were not back, so it counted nothing and sent unpaced bursts into the full window)."""
    outcome = run_against(600, window_seconds=window, quantum=0, rows=3000, latency=7.0)
    assert outcome.refused_share <= 0.02
    assert outcome.goodput >= floor


def test_a_lockout_backs_off_and_ends_at_the_rate_of_the_whole_cycle() -> None:
    """A burst of 600 admitted in the first second, then bare 429s until it leaves a 60 s window: the pauses grow
    (1 s, then 2 s), and the first success after them sets the pace to what the whole minute admitted
    (600 over ~61 s), not the burst's 600 a second."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    for i in range(600):
        clock.now = 0.2 + i / 600
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - 0.2, window_limited=True))
    pauses = []
    while clock.now < 61.0:
        limiter.on_rate_limited(None)
        pauses.append(round(limiter.pause_until - clock.now, 3))
        clock.now = limiter.pause_until + 0.001
    assert pauses[:4] == [1.0, 2.0, 2.0, 2.0]
    assert len(pauses) <= 32, "a minute locked out costs a probe every two seconds, not a round of them a second"
    sent = clock.now
    clock.now += 0.2
    limiter.on_success(Permit(estimated_tokens=1, started=sent, window_limited=False))
    rate = limiter.pacer.rate()
    assert rate is not None and rate == pytest.approx(601 / sent * CUT, rel=0.05)
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(rate * 60)


def test_a_lockout_is_read_as_ending_halfway_through_its_last_pause() -> None:
    """A 10 s window: 200 admitted in the first 2 s, then refusals 1 s and 2 s apart. The window let requests in again
    somewhere in the last pause, so the cycle's rate is counted to its middle (200 over ~10.2 s), not to the first
    request admitted up to a pause later (200 over ~11.2 s: 9% under, held for the whole next window)."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    for i in range(200):
        clock.now = 0.2 + i / 100
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - 0.2, window_limited=True))
    last_refusal = clock.now
    while clock.now < 10.0:
        last_refusal = clock.now
        limiter.on_rate_limited(None)
        clock.now = limiter.pause_until + 0.001
    sent = clock.now
    clock.now += 0.2
    limiter.on_success(Permit(estimated_tokens=1, started=sent, window_limited=False))
    assert limiter.pacer.rate() == pytest.approx(200 / ((last_refusal + sent) / 2) * CUT, rel=0.02)


def test_a_429_right_after_the_pause_is_no_lockout_under_a_one_second_window() -> None:
    """A 1 s window still holding the refusals that opened an overload refuses the first request after the pause
    too: two overloads a second apart are no lockout, so the pace still comes from the busiest second (20/s), not
    from the average since the run began (a ramp at 10/s, then 20/s)."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    for step in [0.1] * 100 + [0.05] * 40:
        clock.now += step
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - 0.2, window_limited=True))
    limiter.on_rate_limited(None)
    clock.now = limiter.pause_until
    limiter.on_rate_limited(None)
    clock.now = limiter.pause_until
    for _ in range(5):
        clock.now += 0.05
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - 0.2, window_limited=True))
    peak = limiter.pacer.peak
    assert peak is not None and peak >= 18


def test_the_probes_of_a_long_lockout_thin_out_with_its_length() -> None:
    """Refusals keep a silent window full: after 1 s, then 2 s, the pause grows to a tenth of the lockout so far,
    up to 4 s (a 10 s window's pauses stay 1 s and 2 s; before: 2 s for a whole minute, about thirty 429s)."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    for i in range(600):
        clock.now = 0.2 + i / 600
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - 0.2, window_limited=True))
    start, pauses = clock.now, []
    while clock.now < start + 60.0:
        limiter.on_rate_limited(None)
        pauses.append((clock.now - start, round(limiter.pause_until - clock.now, 1)))
        clock.now = limiter.pause_until + 0.001
    assert [pause for _, pause in pauses[:6]] == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert all(pause == 4.0 for at, pause in pauses if at >= 40)
    assert len(pauses) <= 24


def test_a_minute_window_refuses_about_one_percent_of_a_two_minute_run() -> None:
    """1,200 RPM over any 60 s, 2,400 rows at 200 ms (the benchmark's case): ≤ 1.1% refused with ≥ 0.95 of the
    limit (before: 1.28%, 31 refusals, all of them probes of the first minute's lockout)."""
    outcome = run_against(1200, window_seconds=60, quantum=0, rows=2400, latency=0.2)
    assert outcome.refused_share <= 0.011
    assert outcome.goodput >= 0.95
