"""What a silent provider admitted over the last minutes, and when it is locking us out.

A provider that says nothing (no rate headers, no retry-after) may hold its limit over any window: a second, ten
seconds (Azure), a minute (OpenAI), and count refused requests in it too. Against a short window the busiest
second shows the rate (`Pacer.admitted_rate`). Against a long one a burst is admitted whole and then everything is
refused until it has left the window, and every refused request stays in the window as well: retrying each second
keeps the window full, and the busiest second shows the burst, many times the rate the provider really sustains.

So the `Pacer` keeps this log beside it:

- **A lockout** is a run of overloads with nothing admitted in between, lasting 5 s or more. The pause doubles
  (`LOCKOUT_PAUSE`: 1 s, then 2 s), and the bucket paces at the rate below, so refusals do not come in a round
  every second. A lockout that has lasted a while shows a window at least that long, and the probes thin out
  with it: a pause is at least `LOCKOUT_SHARE` of the lockout so far, up to `LOCKOUT_LONGEST` (a minute's
  window costs about twenty 429s instead of thirty, each of which also stays in the window; a 10 s window's
  pauses are as before). Longer pauses would cost fewer still, but the lockout's end would show later, and
  every second it shows late is a second of the limit unused.
- **The sustained rate** is what was admitted, by send time, over the last `HORIZON` seconds (or since the run
  began), the lockout included. Over a window's whole cycle (its burst and its lockout) that is the window's limit
  over its length, whatever the length; when the lockout ends, the pace starts there.
"""

from __future__ import annotations

import math
from typing import Final

HORIZON: Final = 120.0  # seconds of admissions kept: a 60 s window's burst and lockout both fit
LOCKOUT_PAUSE: Final = (1.0, 2.0)  # the pause after a silent 429: the first, and the most it doubles to
LOCKOUT_SHARE: Final = 0.1  # ...and at least this share of the lockout so far (its window is at least that long)
LOCKOUT_LONGEST: Final = 4.0  # ...up to this many seconds (its end shows late by half a pause, on average)
# A refusal right after a pause can come from a 1 s window still holding the refusals that opened it (a slow
# 429 lets more requests out first): only a lockout this long shows a window longer than a second.
LONG_LOCKOUT: Final = 5.0


class Admissions:
    """Successful requests counted per second of their send time, and the overloads that came in a row."""

    __slots__ = (
        "_counts",
        "_cycle_start",
        "_last_sent",
        "_overload_at",
        "_streak_start",
        "ended_at",
        "streak",
        "window",
    )

    def __init__(self, start: float) -> None:
        self._cycle_start = start  # since the run began, or the last lockout ended: one burst and its lockout
        self._counts: dict[int, int] = {}
        self._last_sent = -math.inf
        self._overload_at: float | None = None
        self._streak_start = start
        self.streak = 0  # overloads in a row with nothing admitted between them (0: none under way)
        self.window = 0.0  # the longest lockout seen (s): the provider's window is at least this long
        self.ended_at = start  # when the last lockout ended, as far as its probes show (see `note`)

    def note(self, sent: float) -> bool:
        """Count a request sent at `sent` that succeeded; True if it ends a lockout (its pace must be measured)."""
        second = math.floor(sent)
        self._counts[second] = self._counts.get(second, 0) + 1
        if len(self._counts) > HORIZON + 4:
            horizon = second - HORIZON - 2
            for old in [s for s in self._counts if s < horizon]:
                del self._counts[old]
        self._last_sent = max(self._last_sent, sent)
        ended = False
        if self._overload_at is not None and sent >= self._overload_at:
            ended = self.locked_out(sent)
            if ended:
                self.window = max(self.window, sent - self._streak_start)
                # Its end lies between the last refused probe and this request, a pause apart (up to 2 s): halfway
                # is the best guess. The first admitted request itself would make the cycle look up to a pause
                # longer than it was, and its rate that much lower.
                self.ended_at = (self._overload_at + sent) / 2
            self.streak, self._overload_at = 0, None
        return ended

    def locked_out(self, now: float) -> bool:
        """Whether overloads have come in a row, nothing admitted between them, for `LONG_LOCKOUT` or longer."""
        return self.streak >= 2 and now - self._streak_start >= LONG_LOCKOUT

    def new_cycle(self, now: float) -> None:
        """A lockout ended and its rate was measured: the next one is measured from here."""
        self._cycle_start = now

    def next_streak(self) -> int:
        """What `streak` becomes if an overload opens now."""
        locked = self._overload_at is not None and self._last_sent < self._overload_at
        return self.streak + 1 if locked else 1

    def on_overload(self, now: float) -> int:
        """A new overload opened at `now`; return the streak it makes (see `locked_out`)."""
        self.streak = self.next_streak()
        if self.streak == 1:
            self._streak_start = now
        self._overload_at = now
        return self.streak

    def pause(self, streak: int, now: float) -> float:
        """Seconds to pause after a silent 429 at `now` of an overload with this streak."""
        first, most = LOCKOUT_PAUSE
        pause = min(most, first * 2.0 ** max(0, streak - 1))
        if streak >= 2:  # the streak under way, which began at _streak_start
            pause = max(pause, min(LOCKOUT_LONGEST, LOCKOUT_SHARE * (now - self._streak_start)))
        return float(pause)

    def busiest(self, until: float, span: float) -> float | None:
        """Admitted requests per second in the busiest `span` (whole seconds) of the three spans before `until`."""
        width = max(1, math.ceil(span))
        end = math.floor(until)
        counts = [self._counts.get(second, 0) for second in range(end - 3 * width, end + 1)]
        best = total = 0
        for i, n in enumerate(counts):
            total += n - (counts[i - width] if i >= width else 0)
            best = max(best, total)
        return best / width if best else None

    def rate(self, now: float, *, shortest: float) -> float | None:
        """Admitted requests per second over this cycle (since the start or the last lockout; at most `HORIZON`
        seconds, at least `shortest`)."""
        span = max(shortest, min(HORIZON, now - self._cycle_start))
        since = now - span
        total = sum(n for second, n in self._counts.items() if second + 1 > since and second <= now)
        return total / span if total else None
