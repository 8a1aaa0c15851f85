"""The limiter: token buckets, 429 pauses and the AIMD window, on a virtual clock (no test sleeps)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.ratelimit.headers import parse_duration, retry_after_seconds
from pipeline.ratelimit.limiter import SAFETY, Limiter, LimitSettings, Permit, TokenBucket
from pipeline.ratelimit.pacing import CUT, Pacer
from pipeline.sinks.limit_memory import LimitMemory
from pipeline.sinks.meta import SinkMeta


class VirtualClock:
    """Time that only moves when a coroutine sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def test_bucket_paces_to_its_rate() -> None:
    """A 60/min bucket with a one-second burst lets one request through per second."""
    clock = VirtualClock()
    bucket = TokenBucket(60, clock)
    assert bucket.delay(1) == 0
    bucket.take(1)
    assert bucket.delay(1) == pytest.approx(1.0)
    clock.now += 0.5
    assert bucket.delay(1) == pytest.approx(0.5)


def test_bucket_accepts_one_request_larger_than_itself_then_waits() -> None:
    """A request bigger than the bucket passes when the bucket is full and leaves a debt to wait out."""
    clock = VirtualClock()
    bucket = TokenBucket(600, clock)  # 10 tokens/s, capacity 10
    assert bucket.delay(50) == 0
    bucket.take(50)
    assert bucket.delay(1) == pytest.approx(4.1)


def test_bucket_refund_corrects_an_overestimate() -> None:
    """Tokens given back after the reply can be spent again at once."""
    clock = VirtualClock()
    bucket = TokenBucket(600, clock)
    bucket.take(10)
    bucket.give_back(6)
    assert bucket.delay(6) == 0


def run_requests(
    limiter: Limiter, clock: VirtualClock, n: int, tokens: int = 1, rate_limit_at: set[int] | None = None
) -> list[float]:
    """Start n requests through the limiter; return the virtual times at which each got its slot."""
    starts: list[float] = []

    async def one(i: int) -> None:
        async with limiter.slot(tokens):
            starts.append(clock())
            if rate_limit_at and i in rate_limit_at:
                limiter.on_rate_limited(2.0)

    async def main() -> None:
        for i in range(n):
            await one(i)

    asyncio.run(main())
    return starts


def test_rpm_limit_spaces_requests() -> None:
    """With --rpm 120, 10 back-to-back requests take about 10/(2·SAFETY) seconds, never faster."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=5, rpm=120), clock=clock, sleep=clock.sleep)
    starts = run_requests(limiter, clock, 10)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps[2:]) >= 1 / (2 * SAFETY) - 1e-9
    assert starts[-1] <= 10 / (2 * SAFETY)


def test_tpm_limit_uses_token_estimates() -> None:
    """With --tpm 6000, 1000-token requests go about one per 10.5 s after the burst."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=5, tpm=6000), clock=clock, sleep=clock.sleep)
    starts = run_requests(limiter, clock, 4, tokens=1000)
    assert starts[-1] - starts[-2] == pytest.approx(1000 / (6000 * SAFETY / 60), rel=0.01)


def test_429_pauses_everyone_and_halves_the_window() -> None:
    """After a 429 with Retry-After 2 s, no request starts for 2 s, and the window halves once per burst."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=8), clock=clock, sleep=clock.sleep)
    starts = run_requests(limiter, clock, 3, rate_limit_at={0})
    assert starts[1] - starts[0] >= 2.0
    assert limiter.limit == 4
    limiter.on_rate_limited(2.0)
    limiter.on_rate_limited(2.0)  # more 429s from the same overload do not cut again
    assert limiter.limit == 2


def test_window_grows_back_on_success() -> None:
    """After the first 429, each window-limited success adds 1/window: one slot per window's worth of successes."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=8), clock=clock, sleep=clock.sleep)
    limiter.on_rate_limited(1.0)
    assert limiter.limit == 4
    for _ in range(4):
        limiter.on_success(_permit())
    assert limiter.limit == 4
    limiter.on_success(_permit())
    assert limiter.limit == 5


def test_slow_start_doubles_until_the_first_429() -> None:
    """From 10, each window-limited success adds one (doubling per round trip), up to the ceiling."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=100), clock=clock, sleep=clock.sleep)
    assert limiter.limit == 10
    for _ in range(10):
        limiter.on_success(_permit())
    assert limiter.limit == 20
    for _ in range(200):
        limiter.on_success(_permit())
    assert limiter.limit == 100


def test_window_does_not_grow_when_something_else_holds_requests_back() -> None:
    """Successes of requests that did not fill the window (bucket- or input-bound) do not grow it."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=100), clock=clock, sleep=clock.sleep)
    for _ in range(50):
        limiter.on_success(Permit(estimated_tokens=1, started=0.0, window_limited=False))
    assert limiter.limit == 10


def test_headers_teach_the_limits_before_any_429() -> None:
    """x-ratelimit-limit-* headers set the buckets to 95% of the provider's limits (never above --rpm/--tpm)."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=50, rpm=300), clock=clock, sleep=clock.sleep)
    limiter.observe_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000"})
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(300 * SAFETY)
    assert limiter._tpm is not None and limiter._tpm.per_minute == pytest.approx(60000 * SAFETY)
    limiter.observe_headers({"x-ratelimit-limit-requests": "120"})
    assert limiter._rpm.per_minute == pytest.approx(120 * SAFETY)


def test_spent_provider_window_pauses_until_its_reset() -> None:
    """When the key's window is spent (others share it), everyone waits for x-ratelimit-reset-requests."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=10), clock=clock, sleep=clock.sleep)
    limiter.in_flight = 5
    limiter.observe_headers({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "0s"})
    assert limiter.pause_until == 0, "requests in flight were counted when they arrived: no pause while some remain"
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert limiter.pause_until == pytest.approx(1.5)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "50", "x-ratelimit-reset-requests": "9s"})
    assert limiter.pause_until == pytest.approx(1.5)


def test_auto_grows_by_half_a_round_trip_and_stops_when_replies_slow_down() -> None:
    """Auto mode with no limit known: the window grows by half each round trip while replies keep their latency,
    and startup ends (back to what the best round had in flight) once they come back 1.25× slower."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)

    def round_trip(latency: float) -> None:
        replies = limiter.limit
        for _ in range(replies):  # a full window's replies, evenly over one round trip
            clock.now += latency / replies
            limiter.on_success(Permit(estimated_tokens=1, started=clock.now - latency, window_limited=True))

    sizes = []
    for _ in range(4):
        round_trip(0.2)
        sizes.append(limiter.limit)
    assert all(1.4 <= b / a <= 1.6 for a, b in itertools.pairwise([10, *sizes])), sizes
    round_trip(0.3)
    assert limiter.limit <= sizes[-1]
    assert limiter.pacer.knee.phase == "hold"


def test_concurrency_is_a_ceiling() -> None:
    """No more than `concurrency` requests are ever in flight."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings(concurrency=3), clock=clock, sleep=clock.sleep)
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with limiter.slot(1):
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(20):
                group.create_task(one())

    asyncio.run(main())
    assert peak == 3


def _permit() -> Permit:
    return Permit(estimated_tokens=1, started=0.0, window_limited=True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("120ms", 0.12), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("", None), ("soon", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    """OpenAI's x-ratelimit-reset-* durations parse to seconds; junk parses to None."""
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_ms_then_seconds_then_reset_headers() -> None:
    """retry-after-ms wins over retry-after, which wins over the x-ratelimit-reset-* headers."""
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "500ms"}) == 2.0
    assert retry_after_seconds({}) is None


def successes(limiter: Limiter, clock: VirtualClock, n: int, latency: float) -> None:
    """n replies, each `latency` seconds after its request, one every rate step (the clock moves to the reply)."""
    for _ in range(n):
        limiter.on_success(Permit(estimated_tokens=1, started=clock.now - latency, window_limited=True))


def test_a_known_rate_sizes_the_window_by_littles_law() -> None:
    """12,000 RPM learned from headers at 3 s latency: the window jumps to rate × latency × 1.5, not by ones."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    assert limiter.limit == 10
    clock.now = 3.0
    limiter.observe_headers({"x-ratelimit-limit-requests": "12000"})
    successes(limiter, clock, 3, latency=3.0)
    rate = 12000 * SAFETY / 60
    assert limiter.limit >= rate * 3.0 * 1.5
    assert limiter.limit <= rate * 3.0 * 1.5 + 10


def test_auto_has_no_small_ceiling_and_a_fixed_concurrency_stays_a_ceiling() -> None:
    """Auto may hold thousands in flight when the limit and latency call for it; --concurrency N never more than N."""
    clock = VirtualClock()
    auto = Limiter(LimitSettings.automatic(rpm=60_000), clock=clock, sleep=clock.sleep)
    successes(auto, clock, 3, latency=2.0)
    assert auto.limit > 2000
    fixed = Limiter(LimitSettings(concurrency=300, rpm=60_000), clock=clock, sleep=clock.sleep)
    successes(fixed, clock, 3, latency=2.0)
    assert fixed.limit == 300


def test_the_rate_share_scales_given_and_learned_limits() -> None:
    """With share 1/4, a 600 RPM limit (given or announced) paces this process at a quarter of it."""
    clock = VirtualClock()
    given = Limiter(LimitSettings(concurrency=50, rpm=600, share=0.25), clock=clock, sleep=clock.sleep)
    assert given._rpm is not None and given._rpm.per_minute == pytest.approx(150 * SAFETY)
    learned = Limiter(LimitSettings(concurrency=50, share=0.25), clock=clock, sleep=clock.sleep)
    learned.observe_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "40000"})
    assert learned._rpm is not None and learned._rpm.per_minute == pytest.approx(150 * SAFETY)
    assert learned._tpm is not None and learned._tpm.per_minute == pytest.approx(10_000 * SAFETY)


def test_a_429_without_headers_teaches_the_admitted_rate_then_probes_gently() -> None:
    """No limit known: after a 429 the pace becomes 95% of the rate the provider admitted, returns to 97% of it
    within a round trip, holds there for the plateau, and only then creeps up."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    for _ in range(100):  # ten seconds of 10 admitted requests per second, 200 ms each
        clock.now += 0.1
        successes(limiter, clock, 1, latency=0.2)
    limiter.on_rate_limited(None)
    assert limiter.pause_until == pytest.approx(clock.now + 1.0), "a bare 429 pauses everyone for a second"
    for _ in range(5):  # the replies of requests sent just before the 429 come back
        clock.now += 0.1
        successes(limiter, clock, 1, latency=0.2)
    assert limiter.pacer.peak == pytest.approx(10, rel=0.15)
    paced = limiter.pacer.rate()
    assert paced is not None and paced <= limiter.pacer.peak * 0.97 + 1e-9
    clock.now += 8.0
    successes(limiter, clock, 1, latency=0.2)
    assert limiter.pacer.rate() == pytest.approx(limiter.pacer.peak * 0.97), "holds just under the overload point"
    clock.now += 20.0
    successes(limiter, clock, 1, latency=0.2)
    later = limiter.pacer.rate()
    assert later is not None and later > limiter.pacer.peak, "after the plateau it probes upward"
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(later * 60)


def test_a_stray_429_under_a_known_limit_costs_one_round_trip_and_a_repeat_holds_back() -> None:
    """Headers announce 12,000 RPM at 3 s latency. One 429 (a burst bunched on the way) dips the pace to 95% and
    it is back at the known rate a round trip later; a second 429 within the minute means the limit is not all
    ours: the pace then holds below the rate it had."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    limiter.observe_headers({"x-ratelimit-limit-requests": "12000"})
    successes(limiter, clock, 3, latency=3.0)
    known = 12000 * SAFETY / 60
    assert limiter.pacer.rate() == pytest.approx(known)
    clock.now += 10.0
    limiter.on_rate_limited(0.1)
    assert limiter.pacer.rate() == pytest.approx(known * 0.95)
    clock.now += 3.5
    successes(limiter, clock, 1, latency=3.0)
    assert limiter.pacer.rate() == pytest.approx(known), "a stray 429 costs one round trip"
    assert limiter._rpm is not None and limiter._rpm.per_minute == pytest.approx(known * 60)
    clock.now += 20.0
    limiter.on_rate_limited(0.1)
    for _ in range(20):  # a minute of replies after the second 429
        clock.now += 3.0
        successes(limiter, clock, 1, latency=3.0)
    held = limiter.pacer.rate()
    assert held is not None and held <= known * 0.97 + 1e-9, "a repeated 429 is not stray: the pace holds back"


def test_a_slow_bucket_keeps_its_rate_when_sleeps_overshoot_and_never_passes_the_limit_in_a_second() -> None:
    """1,200 RPM known (19 requests/s paced, 20 allowed in any second) and every sleep 1 ms late: the requests
    still leave at 19/s, and no sliding second holds more than 20."""
    clock = VirtualClock()

    async def late_sleep(seconds: float) -> None:
        clock.now += max(0.0, seconds) + 0.001
        await asyncio.sleep(0)

    limiter = Limiter(LimitSettings(concurrency=100, rpm=1200), clock=clock, sleep=late_sleep)
    starts = run_requests(limiter, clock, 1900)
    rate = (len(starts) - 1) / (starts[-1] - starts[0])
    assert rate >= 0.99 * 1200 * SAFETY / 60
    j = 0
    for i, t in enumerate(starts):
        while starts[j] <= t - 1.0:
            j += 1
        assert i - j + 1 <= 20, f"{i - j + 1} requests in the second before {t:.3f}"


def test_the_hold_after_repeated_429s_ends_within_two_minutes_even_for_a_slow_model() -> None:
    """1,200 RPM known, replies take 30 s, two 429s 40 s apart: the pace holds below the rate it had (fifty round
    trips would be 25 minutes), and after two minutes it probes back up toward the limit."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(rpm=1200), clock=clock, sleep=clock.sleep)
    successes(limiter, clock, 3, latency=30.0)
    limiter.on_rate_limited(0.1)
    clock.now += 40.0  # past the first overload's round trip: a new one, within the minute
    limiter.on_rate_limited(0.1)
    peak = limiter.pacer.peak
    assert peak is not None
    clock.now += 100.0
    successes(limiter, clock, 1, latency=30.0)
    assert limiter.pacer.rate() == pytest.approx(peak * 0.97)
    clock.now += 100.0
    successes(limiter, clock, 1, latency=30.0)
    later = limiter.pacer.rate()
    assert later is not None and later > peak * 0.97


def test_overloads_that_show_the_same_rate_again_make_the_probes_rarer() -> None:
    """No headers, a provider that admits 10 requests/s: each overload that shows the same rate again doubles the
    hold before the next probe (10 s, 20 s, 40 s), so a confirmed limit is not sawed at every few seconds."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)

    def admit(seconds: float) -> None:
        for _ in range(round(seconds * 10)):
            clock.now += 0.1
            successes(limiter, clock, 1, latency=0.2)

    admit(10)
    holds = []
    for _ in range(3):
        limiter.on_rate_limited(None)
        overload = clock.now
        admit(0.5)
        peak = limiter.pacer.peak
        assert peak is not None and peak == pytest.approx(10, rel=0.15)
        while (limiter.pacer.rate() or 0) <= peak * 0.97 + 1e-9:
            admit(0.1)
        holds.append(clock.now - overload)
    assert holds[0] == pytest.approx(10, abs=0.5)
    assert holds[1] == pytest.approx(20, abs=0.5)
    assert holds[2] == pytest.approx(40, abs=0.5)


def test_a_stray_429_ends_after_a_round_trip_even_when_the_known_rate_moved_meanwhile() -> None:
    """A token limit's request rate follows what requests cost: if it rises during the round trip after a stray
    429, the pace still returns to the (new) known rate instead of staying at the old one."""
    pacer = Pacer(ceiling=1000, auto=True)
    pacer.set_known_rate(10.0)
    for t in (1.0, 1.1, 1.2):
        pacer.on_success(1.0, window_limited=False, now=t)
    pacer.on_overload(5.0, until=5.1)
    assert pacer.rate() == pytest.approx(9.5)
    pacer.set_known_rate(11.0)
    pacer.on_success(1.0, window_limited=False, now=6.5)
    assert pacer.rate() == pytest.approx(11.0)


class WallClock:
    """A wall clock for the limit memory's freshness, set by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def memory_at(tmp_path: Path, clock: WallClock, *, endpoint: str = "http://127.0.0.1:9/v1", model: str = "m") -> Any:
    meta = SinkMeta(tmp_path / "out.jsonl")
    return LimitMemory(meta.limits_path, meta.write_json_atomic, endpoint=endpoint, model=model, clock=clock)


def test_a_remembered_rate_starts_the_pace_at_this_processs_share(tmp_path: Path) -> None:
    """A run that learned 20 requests/s from 429s (the whole key's rate) remembers it; a run with --rate-share 1/2
    starts pacing at half of it, just under (97%), before any request."""
    wall = WallClock()
    learner = Limiter(LimitSettings.automatic()).remembering(memory_at(tmp_path, wall))
    learner.pacer.recall(20.0, window=60.0)
    learner._keep()
    clock = VirtualClock()
    resumed = Limiter(LimitSettings.automatic(share=0.5), clock=clock, sleep=clock.sleep)
    resumed.remembering(memory_at(tmp_path, wall))
    assert resumed.pacer.rate() == pytest.approx(10.0 * 0.97)
    assert resumed._rpm is not None and resumed._rpm.per_minute == pytest.approx(10.0 * 0.97 * 60)
    assert resumed.pacer.admissions.window == 60.0, "the window its lockouts showed is remembered too"


@pytest.mark.parametrize(
    ("age", "endpoint", "model"),
    [(2 * 86_400, "http://127.0.0.1:9/v1", "m"), (0, "http://127.0.0.1:8/v1", "m"), (0, "http://127.0.0.1:9/v1", "n")],
    ids=["a day old", "another endpoint", "another model"],
)
def test_a_stale_or_foreign_memory_is_ignored(tmp_path: Path, age: float, endpoint: str, model: str) -> None:
    """Limits remembered more than a day ago, or for another endpoint or model, leave the run to learn afresh."""
    wall = WallClock()
    memory_at(tmp_path, wall).keep({"rate": 20.0, "rpm": 600.0})
    wall.now += age
    limiter = Limiter(LimitSettings.automatic()).remembering(memory_at(tmp_path, wall, endpoint=endpoint, model=model))
    assert limiter.pacer.rate() is None


def test_limits_announced_by_headers_beat_remembered_ones(tmp_path: Path) -> None:
    """A remembered 600 RPM paces the run from the start; the first headers that announce 1,200 RPM replace it,
    and a rate remembered from 429s gives way to an announced limit too."""
    wall = WallClock()
    memory_at(tmp_path, wall).keep({"rpm": 600.0})
    limiter = Limiter(LimitSettings.automatic()).remembering(memory_at(tmp_path, wall))
    assert limiter.pacer.rate() == pytest.approx(600 * SAFETY / 60)
    limiter.observe_headers({"x-ratelimit-limit-requests": "1200"})
    assert limiter.pacer.rate() == pytest.approx(1200 * SAFETY / 60)
    assert orjson.loads(SinkMeta(tmp_path / "out.jsonl").limits_path.read_bytes())["rpm"] == 1200
    memory_at(tmp_path, wall).keep({"rate": 5.0})
    taught = Limiter(LimitSettings.automatic()).remembering(memory_at(tmp_path, wall))
    assert taught.pacer.rate() == pytest.approx(5.0 * 0.97)
    taught.observe_headers({"x-ratelimit-limit-requests": "1200"})
    assert taught.pacer.rate() == pytest.approx(1200 * SAFETY / 60)


def test_the_memory_names_its_endpoint_without_anything_that_may_carry_a_key(tmp_path: Path) -> None:
    """A base URL with a user, password or query is recorded by scheme, host, port and path only."""
    meta = SinkMeta(tmp_path / "out.jsonl")
    meta.limit_memory(["https://user:sk-secret@llm.example.com:8443/v1/?key=sk-other"], "m").keep({"rate": 3.0})
    text = meta.limits_path.read_text()
    assert "sk-" not in text and "user" not in text
    assert orjson.loads(text)["endpoint"] == "https://llm.example.com:8443/v1"


def test_the_first_requests_slow_connections_do_not_halve_the_rate_a_429_teaches() -> None:
    """A run's first 10 requests wait 1.45 s for their connections, then reach the provider in the same second as
    the next 10 (20 admitted a second, then a 429): the rate learned is 20 a second, not 10 (a request that took
    far longer than usual is counted from its reply less the usual latency, not from when it left)."""
    clock = VirtualClock()
    limiter = Limiter(LimitSettings.automatic(), clock=clock, sleep=clock.sleep)
    clock.now = 1.5
    successes(limiter, clock, 10, latency=1.5)
    for _ in range(10):
        clock.now += 0.005
        successes(limiter, clock, 1, latency=0.05)
    limiter.on_rate_limited(None)
    for _ in range(40):  # the round trip after the 429: the last replies, at the usual latency
        clock.now += 0.01
        successes(limiter, clock, 1, latency=0.05)
    assert limiter.pacer.peak is not None and limiter.pacer.peak >= 18


def test_the_admitted_rate_is_the_busiest_second_even_at_round_trips_of_seconds() -> None:
    """At 3 s replies, a 429 at the end of a ramp (10, 10, then 20 admitted a second) teaches the busiest second's
    20/s, not the 13/s a round trip's average shows, which the pace held for minutes under a 1 s window's 20/s."""
    pacer = Pacer(ceiling=1000, auto=False)
    for second, count in ((0, 10), (1, 10), (2, 20)):
        for i in range(count):
            sent = 10.0 + second + i / count
            pacer.on_success(3.0, window_limited=False, now=sent + 3.0)
    assert pacer.admitted_rate(13.0) == pytest.approx(20)


def test_a_429_soon_after_a_long_lockout_keeps_the_rate_of_the_lockouts_cycle() -> None:
    """200 admitted in 2 s, a 10 s lockout, then a 429 a second after it ended while only 3 a second get in (the
    window lets requests in as fast as the burst leaves it): the pace stays at the cycle's rate (200 over ~12 s), not
    the 3/s of that second, which it held for minutes."""
    pacer, cycle = _a_429_a_second_after_a_long_lockout()
    assert cycle is not None and cycle == pytest.approx(200 / 11.9, rel=0.05)
    assert pacer.peak == pytest.approx(cycle)


def _a_429_a_second_after_a_long_lockout() -> tuple[Pacer, float | None]:
    """200 admitted in 2 s, a 10 s lockout, then a 429 a second after it ended, 3 a second admitted, measured a
    round trip later; the pacer, and the rate the lockout's cycle showed."""
    pacer = Pacer(ceiling=1000, auto=False)
    for i in range(200):
        pacer.on_success(0.2, window_limited=True, now=0.4 + i / 100)
    for at in (3.0, 5.0, 7.0, 9.0, 11.0):
        pacer.on_overload(at, until=at + 1.0)
    pacer.on_success(0.2, window_limited=False, now=13.0)
    cycle = pacer.peak
    for i in range(3):
        pacer.on_success(0.2, window_limited=False, now=13.2 + i / 3)
    pacer.on_overload(14.0, until=15.0)
    pacer.on_success(0.2, window_limited=False, now=14.3)  # a round trip on: the overload is measured
    return pacer, cycle


def test_a_first_429_at_round_trips_of_seconds_paces_at_the_busiest_second_whose_replies_are_back() -> None:
    """At 7 s replies, 10 admitted a second for 10 s, then a 429: the pace drops to 95% of those 10/s at once (before:
    the last three seconds' replies were not back, so it counted nothing, halved the window and sent unpaced bursts
    into a full 60 s window until the round trip had passed: 4.8% refused)."""
    pacer = Pacer(ceiling=1000, auto=False)
    for i in range(100):
        sent = i / 10
        if sent + 7.0 <= 10.0:
            pacer.on_success(7.0, window_limited=False, now=sent + 7.0)
    window = pacer.window
    pacer.on_overload(10.0, until=11.0)
    assert pacer.rate() == pytest.approx(10 * CUT, rel=0.1)
    assert pacer.window == window


def test_a_429_held_up_to_a_lockouts_cycle_rate_does_not_confirm_it() -> None:
    """A 429 right after a long lockout that admitted only 3 a second is raised to the cycle's rate (the window is
    letting the old burst out), but that is the last rate itself, not a second overload showing it: the hold is not
    doubled (before: it counted as a confirmation)."""
    pacer, cycle = _a_429_a_second_after_a_long_lockout()
    assert pacer.peak == pytest.approx(cycle)
    assert pacer._confirmed == 0


def test_a_rate_counted_over_a_minute_window_confirms_only_within_five_percent() -> None:
    """Against a 60 s window an overload counted 10.8/s over the minute after one at 10/s: 8% apart is a different
    rate, not a confirmation (before: the tolerance was 5% + 1/s, a second's rounding, so it doubled the hold)."""
    pacer = Pacer(ceiling=1000, auto=False)
    pacer.recall(10.0, window=60.0)
    for i in range(round(70 * 10.8)):
        pacer.on_success(0.2, window_limited=False, now=0.2 + i / 10.8)
    pacer.on_overload(70.0, until=71.0)
    pacer.on_success(0.2, window_limited=False, now=70.3)
    assert pacer.peak == pytest.approx(10.8, rel=0.02)
    assert pacer._confirmed == 0
