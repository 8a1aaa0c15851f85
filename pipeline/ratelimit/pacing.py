"""How fast a run may send: the in-flight window and the request rate, learned from limits, latency and 429s.

The limiter (`ratelimit/limiter.py`) enforces what the `Pacer` decides:

- **A known rate sizes the window by Little's law.** Once a request rate is known (from `--rpm`/`--tpm` or
  `x-ratelimit-limit-*`, at 95% and at this process's share) and a few replies have shown the latency, the
  window jumps to rate × latency × 1.5: the limit is reached in the second round trip, at any latency, and
  the token bucket, not the window, spaces the requests.
- **No limit known: slow start.** The window doubles every round trip (one more slot per success that found
  the window full) until the first 429. In auto mode the `Knee` (`knee.py`) sizes the window instead until a
  rate is known: it grows while throughput follows and stops at a self-hosted server's knee, where more in
  flight would only queue.
- **A 429 under a known limit is a stray burst** when it finds the pace at that limit and no other overload
  came in the minute (or two round trips) before:
  providers also hold their limits over short intervals, and jitter on the way can bunch requests that left
  evenly. The pace dips to 95% and is back at the known rate a round trip later (a long hold there would
  cost more than the rare 429 it avoids). A second 429 soon after means the limit is not all ours (another
  client on the key): then the pace is handled as below, from the rate it was at.
- **A 429 teaches a rate.** The pace drops to 95% of what it was (or of the busiest second whose replies are back).
  With no known limit, a round trip later, when the replies of the requests sent just before the 429 are back, the
  rate the provider really admitted (by arrival: send time, or reply less the usual latency for a slow one; in the
  busiest second) sets the pace, again at 95%. The pace returns to 97% of that point within a round trip, holds
  there for a while (`PLATEAU_ROUND_TRIPS`, at least 10 s and at most two minutes, so a 30 s model is not held back
  for half an hour; twice as long each time an overload shows the same rate again, so a limit confirmed is probed
  rarely instead of sawed at), and only then probes upward, slowly at first and faster the longer no 429 comes (a
  cubic, like TCP CUBIC): an underestimate is outgrown in a minute, and overloads stay rare. Each costs about one
  round trip of refused requests, so at ordinary latencies the share of 429s stays around 1-3%.
- **A window longer than a second** (10 s, a minute) admits a burst whole and then refuses everything, refused
  requests included, until the burst has left it: a lockout (`admissions.py`). Its pauses grow, its end sets the
  pace to what the whole cycle admitted, the hold lasts at least as long as the lockout did, and later overloads
  count over that length instead of the busiest second (and, within that length of the lockout's end, as no less
  than the cycle's rate: the window is still letting the old burst out).
- **Timeouts in a cluster** (`api/timeouts.py`: a gateway holding requests, a server stalled past the timeout)
  slow the pace like a 429, but no rate is measured from them (none is remembered for the next run), they are
  no lockout (their pauses stay short; a stall's length is not the provider's window), and a window they halve
  stays at least `HELD_FLOOR`, so that a stall's timeouts can still cluster. With the knee in charge they only
  halve the window, once per stall.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

from pipeline.ratelimit.admissions import Admissions
from pipeline.ratelimit.knee import Knee

START_WINDOW: Final = 10
HELD_FLOOR: Final = 4.0  # a window clustered timeouts halve stays at least this (3 must still be able to cluster)
LITTLE_MARGIN: Final = 1.5  # in flight = rate × latency × margin: replies vary, the bucket does the spacing
CUT: Final = 0.95  # after an overload, pace at this share of what the provider admitted
NEAR_PEAK: Final = 0.97  # grow quickly up to this share of the last overload point, slowly beyond
PLATEAU_ROUND_TRIPS: Final = 50  # hold just under the last overload point this long (10 s to 2 minutes)
PLATEAU_SECONDS: Final = (10.0, 120.0)
PROBE_GAIN: Final = 0.1  # then grow by 10% × ((time past the plateau) / plateau)²
CONFIRM: Final = 0.05  # an overload whose admitted rate is within 5% of the last one's confirms the limit
MAX_CONFIRMED: Final = 3  # each confirmation doubles the plateau, up to 8× (still at most 2 minutes)
ADMITTED_SPAN: Final = 1.0  # the admitted rate is the busiest second's (see admitted_rate)
STRAY_SECONDS: Final = 60.0  # a 429 under a known limit with none this long before it (or 2 round trips) is stray


class Latency:
    """Recent reply latency: a fast moving average."""

    __slots__ = ("fast", "samples")

    def __init__(self) -> None:
        self.fast: float | None = None
        self.samples = 0

    def note(self, latency: float) -> None:
        """Fold in one successful request's latency (seconds)."""
        self.samples += 1
        self.fast = latency if self.fast is None else self.fast + 0.2 * (latency - self.fast)


class Pacer:
    """Decides the in-flight window and the paced request rate (see the module docstring)."""

    def __init__(self, *, ceiling: int, auto: bool, clock_start: float = 0.0) -> None:
        self.ceiling = max(1, ceiling)
        self.auto = auto
        self.window = float(min(START_WINDOW, self.ceiling))
        self.threshold = math.inf  # slow start until the first overload
        self.latency = Latency()
        self.known_rate: float | None = None  # requests/s the known limits allow (already at 95% and share)
        self.probe_rate: float | None = None  # requests/s learned from 429s
        self.peak: float | None = None  # the admitted rate at the last overload
        self.last_cut = -math.inf
        self._overload_at = clock_start
        self._last_overload = -math.inf
        self._stray = False  # the current overload is a stray burst under a known limit (see on_overload)
        self._remeasure_at: float | None = None  # when the replies sent before the overload are back
        self._measured: float | None = None  # the admitted rate the last overload without a known limit showed
        self._confirmed = 0  # overloads in a row that showed that same rate (see _grow_probe)
        self._replies: deque[tuple[float, float]] = deque()  # when recent successful requests left and came back
        self.admissions = Admissions(clock_start)  # the last minutes' admissions, for windows longer than a second
        self._lockout_rate = False  # the pace was measured at the end of a lockout
        self._recalled = False  # the pace came from a rate an earlier run learned (see recall)
        self._cycle: tuple[float, float] | None = None  # when the last lockout ended, and its cycle's rate
        self._stalled = False  # timeouts cut the window and no reply has come back since
        self.knee = Knee(self.window, floor=1.0, ceiling=float(self.ceiling), now=clock_start)

    # --- what the limiter asks ---------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return max(1, min(self.ceiling, int(self.window)))

    def rate(self) -> float | None:
        """The request rate to pace at (requests/s), or None to send as fast as the window allows."""
        rates = [r for r in (self.known_rate, self.probe_rate) if r is not None]
        return min(rates) if rates else None

    @property
    def round_trip(self) -> float:
        """The recent latency, or a second before any reply."""
        return self.latency.fast if self.latency.fast is not None else 1.0

    # --- what happened ----------------------------------------------------------------------------

    def on_success(self, latency: float, *, window_limited: bool, now: float) -> None:
        """A request succeeded after `latency` seconds; `window_limited`: it had filled the window."""
        self.latency.note(latency)
        self._stalled = False
        self._replies.append((now - latency, now))
        if self.admissions.note(now - latency):
            self._after_lockout(now, sent=now - latency)
        horizon = now - 4 * max(1.0, min(self.round_trip, 10.0)) - self.round_trip
        while self._replies and self._replies[0][1] < horizon:
            self._replies.popleft()
        self._grow_probe(now)
        self._fit_window()
        if self.auto and self.rate() is None:  # no limit known: find the server's knee
            self.knee.on_reply(latency, window_limited=window_limited, now=now)
            self.window = self.knee.window
            return
        if window_limited and self.window < self.ceiling:
            step = 1.0 if self.window < self.threshold else 1.0 / self.window
            self.window = min(float(self.ceiling), self.window + step)

    def on_overload(self, now: float, *, until: float, refused: bool = True) -> bool:
        """A 429 arrived (`refused`), or timeouts clustered; return True if it opened a new overload (several
        429s from one are cut once; clusters of timeouts within a stall the knee already cut, too).

        `until` is when the pause it caused ends; 429s before then, or within a round trip (requests already
        in flight when the first came back), belong to the same overload.
        """
        if now < self.last_cut:
            return False
        if not refused and self.auto and self.rate() is None:
            # Timeouts with no limit known and the knee in charge: the server stalled or queued past the timeout
            # (vLLM on busy cores stalls for seconds). No 429 says what it admits, and a rate measured in a stall
            # (51/s for a 70 rows/s server) paced the rest of the run: halve the window once per stall (nothing
            # has come back since the last cut: the same stall), never under HELD_FLOOR (halving on, the window
            # fell to 1, where timeouts no longer cluster and use up the rows' retries), and let the knee probe up.
            if self._stalled:
                return False
            self.last_cut = max(until, now + self.round_trip)
            self._stalled = True
            self._halve(HELD_FLOOR)
            return True
        self.last_cut = max(until, now + self.round_trip)
        if refused:  # a stall of held timeouts is no lockout: its length would be kept as the provider's window
            self.admissions.on_overload(now)
        locked_out = self.admissions.locked_out(now)
        self._lockout_rate = self._recalled = False
        current = self.rate()
        quiet = now - self._last_overload > max(STRAY_SECONDS, 2 * self.round_trip)
        self._last_overload = now
        self._stray = self.known_rate is not None and current == self.known_rate and quiet
        if current is None:  # the seconds whose replies are back: those of the last round trip are not, yet
            current = self.admitted_rate(now - self.round_trip if self.round_trip > ADMITTED_SPAN else now)
        current = self._sustained(now, current)
        if current is None:  # nothing admitted yet to learn from: halve the window, like TCP
            # (held timeouts not under HELD_FLOOR: a stall sends clusters on until nothing is in flight to time out)
            self._halve(1.0 if refused else HELD_FLOOR)
            self.threshold = self.window
        else:
            self.peak = current
            self.probe_rate = current * CUT
        self._overload_at = now
        # 429s come back at once, the successes of requests sent just before them a round trip later: only then
        # does the admitted rate show. (With a known limit, a 429 is a stray burst or another client on the key: the
        # known rate is the measure, and the cut from it stands. In a lockout the busiest second is the burst that
        # filled the window: the end of the lockout measures instead.)
        # Held timeouts slow the pace but are not measured: a rate remembered from them would pace the next run too.
        # (They also cancel a measure a 429 left waiting: it would count the seconds before the stall.)
        remeasure = refused and self.known_rate is None and not locked_out
        self._remeasure_at = now + self.round_trip + 0.05 if remeasure else None
        return True

    def admitted_rate(self, until: float) -> float | None:
        """The most requests per second the provider accepted lately: successful requests counted by arrival in
        the busiest second of the three before `until`.

        Providers hold their limits per second as well as per minute; the busiest second is when we pushed against
        the limit, which is what it admits. (Averaging over quieter spans, a ramp or a pause, would underestimate
        it, and an underestimate takes a long probe to outgrow: a round trip of 1.5-3 s still on the ramp counted
        0.73-0.88 of what a 1 s window admits, held for up to two minutes. A longer window shows in a lockout, and
        is then counted over its length: see _grow_probe.)
        """
        span, usual = ADMITTED_SPAN, self.round_trip
        # When each reached the provider: when it left, unless it took far longer than usual: then its reply less
        # the usual latency (a run's first requests wait for their connections, and would look a second early).
        arrived = (sent if reply - sent <= 2 * usual else reply - usual for sent, reply in self._replies)
        sent = sorted(t for t in arrived if until - 3 * span <= t < until)
        if not sent:
            return None
        busiest, first = 0, 0
        for last, t in enumerate(sent):
            while sent[first] <= t - span:
                first += 1
            busiest = max(busiest, last - first + 1)
        return busiest / span

    @property
    def _span(self) -> float:
        """The shortest span a cycle's rate is counted over, and the window length past which an overload counts
        over the window (see _grow_probe): a round trip, 1–10 s."""
        return max(1.0, min(self.round_trip, 10.0))

    def set_known_rate(self, rate: float | None) -> None:
        """The request rate the known limits allow (requests/s), or None."""
        self.known_rate = rate
        if rate is not None and self._recalled:  # a limit announced or given beats one remembered
            self.probe_rate = self.peak = self._measured = None
            self._recalled = False
        self._fit_window()

    def rescale(self, ratio: float) -> None:
        """This process's share of the key changed by `ratio`: what 429s taught was this process's part of the
        key's rate, so it scales with it (both ways, so a share that grows and shrinks back leaves it as it was)."""
        if self.known_rate is None:
            return  # without a known limit the 429s are all there is to go by, whatever the share
        for name in ("probe_rate", "peak", "_measured"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value * ratio)

    @property
    def learned_rate(self) -> float | None:
        """The rate the provider's 429s showed it admits (requests/s, this process's part), when no limit is known."""
        return self._measured if self.known_rate is None else None

    def recall(self, rate: float, *, window: float) -> None:
        """Start at a rate an earlier run learned from 429s (and the window its lockouts showed): hold just under
        it from the start, as after an overload, instead of spending the first round trips finding it again."""
        self.peak = self._measured = rate
        self.probe_rate = rate * NEAR_PEAK
        self.admissions.window = max(self.admissions.window, window)
        self._recalled = True

    def quiet_pause(self, now: float) -> float:
        """Seconds to pause after a 429 that does not say: longer for each overload in a row that nothing got past
        (429s only: clustered timeouts are no lockout, and pause a second unless a 429 streak is under way)."""
        streak = self.admissions.streak if now < self.last_cut else self.admissions.next_streak()
        return self.admissions.pause(streak, now)

    # --- inside -----------------------------------------------------------------------------------

    def _sustained(self, now: float, current: float | None) -> float | None:
        """In a lockout (see admissions.py), no more than the rate admitted over the last minutes."""
        if not self.admissions.locked_out(now) or self.known_rate is not None:
            return current
        sustained = self.admissions.rate(now, shortest=self._span)
        if sustained is None:
            return current
        return sustained if current is None else min(current, sustained)

    def _after_lockout(self, now: float, *, sent: float) -> None:
        """A request sent at `sent` got past a lockout: pace from the rate admitted over the window's whole cycle
        (up to that moment: the lockout ended then), and hold it."""
        if self.known_rate is not None:
            return
        rate = self.admissions.rate(self.admissions.ended_at, shortest=self._span)
        self.admissions.new_cycle(now)
        if rate is None:
            return
        self.peak = self._measured = rate
        self.probe_rate = rate * CUT
        self._cycle = (now, rate)
        self._lockout_rate = True  # a lower bound (the lockout's end shows late): probe after one window
        self._confirmed = 0
        self._overload_at = now
        self._remeasure_at = None

    def _not_under_cycle(self, admitted: float | None) -> float | None:
        """An overload within a long window's length of a lockout's end: no less than that cycle's rate.

        The window still holds the burst that caused the lockout, and lets requests in only as fast as that burst
        leaves it: its first seconds admit what the ramp sent a window ago (43/s of a 200/s limit after a 60 s
        window's lockout, held for two minutes), not what the window allows. The cycle's rate measured that.
        """
        cycle = self._cycle
        if admitted is None or cycle is None or self._overload_at - cycle[0] >= self.admissions.window:
            return admitted
        return max(admitted, cycle[1])

    def _halve(self, floor: float) -> None:
        """Halve the window, not under `floor` (nor up to it from below), and let the knee probe from there."""
        self.window = max(min(self.window, floor), self.window / 2)
        self.knee.restart(self.window)

    def _fit_window(self) -> None:
        """Little's law: enough in flight to send at the paced rate for one round trip, with a margin."""
        rate = self.rate()
        if rate is None or self.latency.samples < 3:
            return
        target = math.ceil(rate * self.round_trip * LITTLE_MARGIN) + 2
        if target > self.window:
            self.window = float(min(self.ceiling, target))

    def _grow_probe(self, now: float) -> None:
        if self._remeasure_at is not None and now >= self._remeasure_at:
            self._remeasure_at = None
            admitted = self.admitted_rate(self._overload_at)
            span, window = ADMITTED_SPAN, self.admissions.window
            if admitted is not None and window > self._span:
                # The provider's window is longer than the span (a lockout showed it): it admits bursts that its
                # whole window does not sustain, so count over the window.
                over_window = self.admissions.busiest(self._overload_at, window)
                if over_window is not None and over_window < admitted:
                    admitted, span = over_window, max(1.0, math.ceil(window))
            if admitted is not None:
                # An overload at the rate the last one showed confirms the limit: probe half as often. (Give or take
                # one request per span counted over: a short span's count is a small integer. Judged on what this
                # overload counted, before the cycle floor: the floor is the last rate itself, and would confirm it.)
                tolerance = CONFIRM * admitted + 1 / span
                same = self._measured is not None and abs(admitted - self._measured) <= tolerance
                self._confirmed = min(self._confirmed + 1, MAX_CONFIRMED) if same else 0
            admitted = self._not_under_cycle(admitted)
            if admitted is not None:
                self._measured = self.peak = admitted
                self.probe_rate = admitted * CUT
        peak = self.peak
        if self.probe_rate is None or peak is None:
            return
        rtt = self.round_trip
        elapsed = now - self._overload_at
        shortest, longest = PLATEAU_SECONDS
        # A window as long as the lockouts were is slow to show an overshoot: hold and probe on its time scale.
        hold = max(shortest, self.admissions.window, 0 if self._lockout_rate else PLATEAU_ROUND_TRIPS * rtt)
        plateau = min(longest, hold * 2**self._confirmed)
        if self._stray:  # back at the known limit a round trip later
            if elapsed >= rtt:
                self.probe_rate = self.peak = None
                self._stray = False
                return
            rate = peak * (CUT + (1.0 - CUT) * elapsed / rtt)
        elif elapsed <= plateau:
            rate = peak * min(NEAR_PEAK, CUT + (NEAR_PEAK - CUT) * elapsed / rtt)
        else:
            rate = peak * NEAR_PEAK * (1 + PROBE_GAIN * ((elapsed - plateau) / plateau) ** 2)
        if self.known_rate is not None and rate >= self.known_rate:
            self.probe_rate = self.peak = None  # back at the known limit: nothing left to probe
            return
        self.probe_rate = rate
