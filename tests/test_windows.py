"""Silent providers with windows of any length, on a virtual clock: the real limiter against the simulator's windows."""

from __future__ import annotations

import pytest

from pipeline.limits import Limiter, LimitSettings, Permit
from pipeline.pacing import CUT

from .test_limits import VirtualClock
from .virtual_provider import run_against


@pytest.mark.parametrize("window", [10, 60])
def test_silent_windows_of_any_length_keep_429s_rare_and_goodput_high(window: int) -> None:
    """600 RPM held over any 10 s or 60 s (refused requests counted, no headers, no retry-after): ≤ 2% of requests
    are refused and the run admits ≥ 0.9 of the limit, start to finish (a 1 s window already did)."""
    outcome = run_against(600, window_seconds=window, quantum=0, rows=3000, latency=0.2)
    assert outcome.refused_share <= 0.02
    assert outcome.goodput >= 0.9


def test_a_lockout_backs_off_and_ends_at_the_rate_of_the_whole_cycle() -> None:
    """A burst of 600 admitted in the first second, then bare 429s until it leaves a 60 s window: the pauses grow
    (1 s, 2 s, 4 s, then 4 s), and the first success after them sets the pace to what the whole minute admitted
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
    assert pauses[:5] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(pauses) <= 18, "a minute locked out costs a handful of probes, not one a second"
    sent = clock.now
    clock.now += 0.2
    limiter.on_success(Permit(estimated_tokens=1, started=sent, window_limited=False))
    rate = limiter.pacer.rate()
    assert rate is not None and rate == pytest.approx(601 / sent * CUT, rel=0.05)
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(rate * 60)
