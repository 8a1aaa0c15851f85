"""Auto concurrency with no rate limit known: find the knee, where more requests in flight stop raising throughput.

A self-hosted server (vLLM, TGI, a gateway in front of one) runs a fixed number of requests at once and queues
the rest. Past that knee every extra request in flight adds waiting and no throughput, and a crash abandons all
of them (a gateway still completes them upstream, and they are paid). The `Knee` sizes the window in rounds of
one round trip (the replies that come back within one recent latency):

- **Startup**: the window grows by half each round trip (one slot per two successes that found it full;
  doubling would overshoot the knee by a whole window before the first queued reply shows it), and less as
  replies get slower than the baseline (÷ (latency ÷ baseline) ** `STARTUP_CARE`). It stops when the last few
  replies are slower than the last round by `STARTUP_RATIO` × or by `STARTUP_SHARE` of what the window grew in
  it, whichever is more (latency growing as fast as the window: a queue; batching slows replies by less),
  when a round's throughput rose by less than `STARTUP_GAIN` twice, or when a round is `QUEUE_RATIO` × the
  baseline. The window then becomes what the best round had in flight (Little's law: its throughput × its
  latency), which drains the queue the overshoot built.
- **Steady: probe, keep what pays.** Every few rounds the window is raised by `STEP`; if the throughput rose by
  at least `ELASTIC` × that share, the step stays and the next comes at once, in longer strides (up to
  `MAX_STEP`), otherwise the window goes back. A window's throughput is the window ÷ its replies' mean latency
  (Little's law), steadier than a count of replies per round. While latency sits above `DOWN_RATIO` × the
  baseline (some of it may be queueing), or once up probes have not paid for `DOWN_HOLD_ROUNDS`, a cut by
  `STEP` is tried as well, and kept if the throughput fell by less than `ELASTIC` × `STEP`. Only measured
  throughput raises the window, so it cannot creep up however the latency drifts; probes that do not pay come
  rarer (every `MIN_HOLD_ROUNDS`, doubling up to every `MAX_HOLD_ROUNDS`), so a probe every so often finds a
  server that got faster.
- **Queued replies: the exact correction.** A server that runs its slots in lock step (every request of a full
  batch takes as long) makes a request that finds no slot wait a whole batch, so its latency has a second mode:
  `QUEUED_RATIO` × the round's median or more. Their share of a round's replies × the window is how many
  requests queue (in the spirit of TCP Vegas, which reads the queue from latency: here only the second mode
  counts, since batching slows every reply without any queue). At a held window that queue is taken out at once
  (a trim, kept if the throughput holds: 66 in flight for 64 slots become 64, where a 15% down probe lost
  throughput and was undone), and an up probe whose extra requests queue ends as soon as they come back, at
  the window less that queue. Once the knee was seen that way, up probes start at `FINE_STEP` and come at
  most every `KNEE_HOLD_ROUNDS`: a full step past a knee seen exactly would only queue. A server that admits
  a queued request the moment any sequence ends (vLLM, with latencies that vary) shows no second mode, only a
  spread (a tenth of its replies are under half the median, its p99 is 3-4× it, at any load): where the fastest
  tenth of recent replies are more than `MODE_SPREAD` under their round's median, no reply counts as queued,
  and the probes and the baseline find the knee alone. Startup's stop allows for the same spread.
- **Baseline**: the lowest round latency within `BASE_SECONDS` (by time, not per reply, so a queue that lasts
  does not become the new normal in a few hundred replies); where replies spread widely, only rounds of
  `SPREAD_EARLY` replies count (half the window, at least `BASE_REPLIES`, for small windows), since the lowest
  mean of a few spread replies is the fast tail, not the typical latency. When two rounds in a row at a held window are
  `QUEUE_RATIO` times slower (against the baseline) than that window was, something queues (another client on
  the server, a server that slowed down): a smaller window is tried at once, and kept if it loses no throughput.

A provider whose latency does not depend on load (OpenAI's API) never shows a knee: startup grows the window
until something else (a 429, a known limit, `--concurrency`, the safety cap) stops it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

STARTUP_GROWTH: Final = 0.5  # slots added per success that found the window full: ×1.5 a round trip
STARTUP_CARE: Final = 4.0  # ...divided by (latency ÷ baseline) to this power: 1.2× slower, half the growth
STARTUP_GAIN: Final = 1.1  # a startup round whose throughput rose less than this (twice) has found the knee
STARTUP_RATIO: Final = 1.25  # ...as has one whose last few replies are this × slower than the last round's
STARTUP_SHARE: Final = 0.8  # ...or slower by this share of what the window grew in it, if that is more
STEP: Final = 0.15  # a probe moves the window by this share, doubling with each that paid in a row...
MAX_STEP: Final = 0.25  # ...up to this share (a knee far above the startup's end is reached in a few probes)
ELASTIC: Final = 0.3  # a probe pays when throughput moves by at least this × the window's share
DOWN_RATIO: Final = 1.25  # latency above this × the baseline may be queueing: try smaller windows too
DOWN_HOLD_ROUNDS: Final = 8  # ...as when up probes have not paid for this many rounds (the baseline may be stale)
QUEUE_RATIO: Final = 2.0  # latency this × what the held window had (vs the baseline): try a smaller window now
BASE_SECONDS: Final = 30.0  # the baseline is the lowest round latency this recent
MIN_HOLD_ROUNDS: Final = 4  # rounds between probes, doubling while they do not pay...
MAX_HOLD_ROUNDS: Final = 32  # ...up to this many
FAST_WEIGHT: Final = 0.25  # startup watches the average of about the last four replies
SETTLE_ROUNDS: Final = 2  # rounds after a change still show the old window, then the burst it sent
MEASURE_ROUNDS: Final = 2  # a window's throughput is the mean of this many rounds (one round's count is noisy)
QUEUED_RATIO: Final = 1.5  # a reply this × slower than its round's median waited for a slot (a second mode)...
MODE_SPREAD: Final = 0.25  # ...if the fastest tenth of replies are within this share of their round's median...
SHAPE_REPLIES: Final = 256  # ...over this many recent replies (at least a quarter of them): a server in lock step
SPREAD_EARLY: Final = 8  # startup's stop allows for the spread of as few replies as this
FINE_STEP: Final = 0.04  # up probes past a knee seen in queued replies start this small...
KNEE_HOLD_ROUNDS: Final = 16  # ...and come at most this often
BASE_REPLIES: Final = 3  # the first round sets the baseline only with this many replies...
SHORT_TRIP: Final = 0.5  # ...or at round trips shorter than this (s), where the ramp takes seconds anyway


class _Round:
    """The replies of one round trip."""

    __slots__ = ("fastest", "latencies", "latency", "limited", "replies", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.replies = 0
        self.limited = 0
        self.latency = 0.0  # sum
        self.fastest = math.inf
        self.latencies: list[float] = []

    def queued(self) -> int:
        """Replies that waited for a slot: those a good deal slower than the round's median (a second mode; the
        knee counts them only on a server in lock step, see `Knee._queued_in`)."""
        ordered = sorted(self.latencies)
        typical = ordered[len(ordered) // 2]
        return sum(1 for latency in ordered if latency > QUEUED_RATIO * typical)

    def shape(self) -> list[float]:
        """Each reply's latency ÷ the round's median (all 1 if that is 0: a coarse clock)."""
        ordered = sorted(self.latencies)
        typical = ordered[len(ordered) // 2]
        return [latency / typical for latency in ordered] if typical > 0 else [1.0] * len(ordered)


class Knee:
    """Finds the in-flight window where a server's throughput stops rising (see the module docstring).

    `window` is the window to use; `on_reply` updates it.
    """

    def __init__(self, window: float, *, floor: float, ceiling: float, now: float = 0.0) -> None:
        self.window = window
        self._start = window
        self.floor = floor
        self.ceiling = ceiling
        self.phase = "startup"  # startup, hold, up (probing a larger window), down (a smaller one), trim (by the queue)
        self._round = _Round(now)
        self._rtt: float | None = None  # the last round's mean latency
        self._round_window = window  # the window when this round began
        self._grown = 1.0  # how much the window grew in the last round
        self._lows: deque[tuple[float, float, int]] = deque()  # (time, round latency, replies), increasing latencies
        self._best: tuple[float, float] | None = None  # startup: (throughput, latency) of the best round
        self._flat = 0  # startup rounds in a row that did not raise the throughput
        self._last_rate = 0.0  # startup: the previous round's throughput
        self._fast: float | None = None  # startup: a moving average of the last few replies' latency
        self._before = window  # the window a probe started from
        self._settle = 0
        self._samples: list[float] = []
        self._queued = 0  # replies that waited a batch for a slot, in the rounds measured so far...
        self._counted = 0  # ...of this many
        self._fine = False  # the knee was seen in queued replies: up probes start at FINE_STEP
        self._untrimmed = 0.0  # a window a trim was tried at and lost throughput
        self._held_rate: float | None = None  # throughput at the held window
        self._held_ratio = 1.0  # its latency ÷ the baseline
        self._paid = 0  # probes in a row that paid
        self._slow = 0  # held rounds in a row slower than QUEUE_RATIO × what the window had
        self._hold_rounds = 1  # the first probe comes soon after startup, which may stop short of the knee
        self._held = 0
        self._shape: deque[float] = deque(maxlen=SHAPE_REPLIES)  # recent replies' latency ÷ their round's median
        self._spread: float | None = None  # how far the fastest tenth of them are below 1 (None: too few yet)

    @property
    def base(self) -> float | None:
        """The baseline latency: the lowest round latency of the last `BASE_SECONDS` (None before any round, or
        while no recent round holds enough replies to count: see `_note_base`)."""
        return self._lows[0][1] if self._lows else None

    def on_reply(self, latency: float, *, window_limited: bool, now: float) -> None:
        """A request succeeded after `latency` seconds; `window_limited`: it had found the window full."""
        current = self._round
        current.replies += 1
        current.latency += latency
        current.limited += window_limited
        current.fastest = min(current.fastest, latency)
        current.latencies.append(latency)
        if self.phase == "startup":
            self._startup_reply(latency, window_limited)
        # A round lasts one round trip; the fastest reply of this one bounds it, so a slow first reply (connections
        # being opened) does not make the first round last long enough for startup to overshoot.
        first = self._rtt is None
        rtt = current.fastest if self._rtt is None else min(self._rtt, current.fastest)
        if now - current.start < rtt:
            return
        self._round = _Round(now)
        self._grown = self.window / max(self._round_window, 1.0)
        self._round_window = self.window
        mean = current.latency / current.replies
        self._rtt = mean
        self._shape.extend(current.shape())
        self._spread = self._spread_of(self._shape)
        # The start window leaves at once, so the first round (it ends at its fastest reply) may hold just that
        # reply, the low end of the jitter: as the baseline it makes every later reply look ~1.2× slower, and
        # startup grows at half speed and stops early (3,000 RPM at 1.5 s: 0.83 of the limit, benchmarks.md).
        # Under half a second the ramp is done in seconds either way, and a faster one only brings a long
        # window's first burst (and its lockout) sooner.
        if not first or current.replies >= BASE_REPLIES or mean < SHORT_TRIP:
            self._note_base(mean, now, current.replies)
        # A round the window did not hold back (the input ran dry, a bucket paced it) says nothing about the knee.
        if 2 * current.limited < current.replies:
            return
        rate = current.replies / max(now - current.start, 1e-9)
        ratio = mean / (self.base or mean)
        slow = self.phase == "hold" and ratio > QUEUE_RATIO * self._held_ratio
        self._slow = self._slow + 1 if slow else 0
        if self._slow >= 2:  # twice in a row, so one stall of our own (a GC pause, a busy machine) is not a queue
            self._probe("down")
        elif self.phase == "startup":
            self._startup_round(rate, mean, ratio)
        elif self.phase == "up" and (queued := self._queued_in(current)) >= 2:
            # The probe's extra requests came back a whole batch late: they queued, so the server was already full.
            # What queued says where the knee is, sooner and more exactly than a throughput that did not rise.
            self._knee_seen(self.window - self.window * queued / current.replies)
        elif self._settle > 0:
            self._settle -= 1
        else:
            # Little's law: the window over the mean latency of a round's replies is its throughput, measured on
            # every reply; counting replies per round adds the noise of where the round's edges fall, which hides
            # the small gains a probe makes on a server whose batches get much slower as they fill.
            self._samples.append(self.window / mean)
            self._queued += self._queued_in(current)
            self._counted += current.replies
            self._held_ratio = ratio if self.phase == "hold" else self._held_ratio
            self._steady_round()

    def restart(self, window: float) -> None:
        """Something else set the window (a 429 halved it): probe from there."""
        self.window = window
        self._move(window, "hold")

    # --- inside -----------------------------------------------------------------------------------

    @staticmethod
    def _spread_of(shape: deque[float]) -> float | None:
        """How far the fastest tenth of recent replies are below their round's median, as a share of it: ~0.1 in
        lock step, ~0.5 on vLLM (None before SPREAD_EARLY replies)."""
        if len(shape) < SPREAD_EARLY:
            return None
        return 1 - sorted(shape)[len(shape) // 10]

    def _queued_in(self, current: _Round) -> int:
        """The round's queued replies where a queue can be told from the spread: on a server whose replies are
        close together at any load (in lock step); elsewhere 0. vLLM's p99 is 3-4× its median at any window, so
        "1.5× the median" is a tenth of its replies, queue or not: read as one, it cut every up probe short and
        trimmed the window to half the slots (0.27 of the best fixed concurrency in tests/test_knee.py)."""
        return current.queued() if self._spread_known() and not self._widely_spread() else 0

    def _note_base(self, latency: float, now: float, replies: int) -> None:
        lows = self._lows
        if self._widely_spread():
            # The mean of a few replies of a widely spread server is mostly chance, and the lowest of many such
            # means is its fast tail (half the typical latency on vLLM): every round then looked twice as slow as
            # the baseline, and the knee kept trying smaller windows. Only rounds of SPREAD_EARLY replies count
            # (half the window, if that is less: a small window's rounds are all small).
            needed = min(SPREAD_EARLY, max(BASE_REPLIES, math.ceil(self.window / 2)))
            if any(n < needed for _, _, n in lows):
                lows = self._lows = deque(low for low in lows if low[2] >= needed)
            if replies < needed:
                latency = math.inf  # expire the old, add nothing
        while lows and lows[-1][1] >= latency:
            lows.pop()  # a lower, newer round makes older, higher ones irrelevant to the minimum
        if latency < math.inf:
            lows.append((now, latency, replies))
        while lows and lows[0][0] < now - BASE_SECONDS:
            lows.popleft()

    def _spread_known(self) -> bool:
        """Whether enough replies are back to judge the spread of the server's latencies."""
        return self._spread is not None and len(self._shape) >= SHAPE_REPLIES // 4

    def _widely_spread(self) -> bool:
        """Whether the server's latencies spread more than in lock step (as far as is known)."""
        return self._spread_known() and (self._spread or 0.0) > MODE_SPREAD

    def _startup_reply(self, latency: float, window_limited: bool) -> None:
        """Grow; stop as soon as the last few replies are much slower than the last round (queued ones are back)."""
        fast = self._fast = latency if self._fast is None else self._fast + FAST_WEIGHT * (latency - self._fast)
        # Against the last round, not the baseline: batching makes replies slower as the window grows (but by less
        # than the window grew, so throughput still rises); a queue makes them slower as fast as the window grows,
        # so a rise within the window's last growth is not yet a queue.
        # Where replies spread widely, the last few are often that much slower by chance: allow for the spread.
        noise = self._spread or 0.0
        if (
            self._rtt is not None
            and fast > max(STARTUP_RATIO + noise, 1 + STARTUP_SHARE * (self._grown - 1)) * self._rtt
            and self._best is not None
        ):
            self._found()
        elif window_limited:
            # Slower replies than the baseline (batching, or the first queued ones): grow more carefully.
            slower = fast / self.base if self.base else 1.0
            self.window = min(self.ceiling, self.window + STARTUP_GROWTH / max(1.0, slower) ** STARTUP_CARE)

    def _startup_round(self, rate: float, latency: float, ratio: float) -> None:
        if self._best is None or rate > self._best[0]:
            self._best = (rate, latency)
        self._flat = self._flat + 1 if rate < STARTUP_GAIN * self._last_rate else 0
        self._last_rate = max(self._last_rate, rate)
        if ratio > QUEUE_RATIO or self._flat >= 2:
            self._found()

    def _found(self) -> None:
        """Startup is over: keep what the best round had in flight (never less than the start)."""
        best_rate, best_latency = self._best or (0.0, 0.0)
        self._move(max(self._start, best_rate * best_latency), "hold")

    def _steady_round(self) -> None:
        """A measured round at a steady window: hold, or judge the probe under way."""
        if len(self._samples) < MEASURE_ROUNDS:
            return
        rate = sum(self._samples) / len(self._samples)
        self._samples = []
        queue = self.window * self._queued / self._counted
        self._queued = self._counted = 0
        held = self._held_rate
        if self.phase == "hold" and queue >= 1 and self.window != self._untrimmed:
            # A second latency mode at a held window: requests that waited a whole batch for a slot. Take exactly
            # that many out (a step by the queue, not a blind STEP), and keep it if the throughput holds.
            self._held_rate = rate if held is None else held
            before = self.window
            self._move(self.window - queue, "trim")
            self._before = before
            return
        if self.phase == "hold" or held is None:
            self._held_rate = rate if held is None else (held + rate) / 2
            self._held += 1
            if self._held >= self._hold_rounds:
                self._probe("up")
            return
        share = abs(self.window - self._before) / self._before
        if self.phase == "up" and rate >= held * (1 + ELASTIC * share):
            self._held_rate = rate
            self._hold_rounds = MIN_HOLD_ROUNDS
            self._fine = False  # the knee moved up: probe in full strides again
            self._paid += 1
            self._probe("up")  # it paid: climb on at once, in longer strides
        elif self.phase == "trim" and rate >= held * (1 - ELASTIC * share):
            self._knee_seen(self.window)  # the queue is gone and nothing was lost: this is the knee
        elif self.phase == "down" and rate >= held * (1 - ELASTIC * share):
            self._held_rate = rate
            self._paid += 1
            self._probe("down")  # nothing lost: shed more
        else:
            self._paid = 0
            went = self.phase
            self._move(self._before, "hold")
            if went == "trim":  # the slow replies were not a queue (it cost throughput): not again at this window
                self._untrimmed = self.window
            self._held_rate = held
            if went == "up" and (self._held_ratio > DOWN_RATIO or self._hold_rounds >= DOWN_HOLD_ROUNDS):
                self._probe("down")
            else:
                self._hold_rounds = min(MAX_HOLD_ROUNDS, 2 * self._hold_rounds)

    def _knee_seen(self, window: float) -> None:
        """Queued replies showed the knee: hold there; later up probes are small and rare, since a full step past
        a knee seen exactly only queues (a server that got faster still shows in them)."""
        self._move(window, "hold")
        self._fine = True
        self._hold_rounds = max(self._hold_rounds, KNEE_HOLD_ROUNDS)

    def _probe(self, direction: str) -> None:
        first = FINE_STEP if self._fine and direction == "up" else STEP
        step = max(1.0, self.window * min(MAX_STEP, first * 2**self._paid))
        target = self.window + step if direction == "up" else self.window - step
        if not self.floor <= target <= self.ceiling:
            self._move(self.window, "hold")
            return
        before = self.window
        self._move(target, direction)
        self._before = before

    def _move(self, window: float, phase: str) -> None:
        self.window = min(self.ceiling, max(self.floor, float(math.ceil(window))))
        self._before = self.window
        self.phase = phase
        self._settle = SETTLE_ROUNDS
        self._samples = []
        self._queued = self._counted = 0
        self._held = 0
        if phase == "hold":
            self._held_rate = None
            self._paid = 0
