"""A token bucket that may go into debt: the building block of the limiter's RPM and TPM pacing."""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """A token bucket that may go into debt, so one request larger than the bucket still passes.

    `per_minute` is the sustained rate; up to `burst_seconds` of it may be spent at once.
    """

    def __init__(
        self, per_minute: float, clock: Clock, *, burst_seconds: float = 1.0, slack: float = 0.0, full: bool = True
    ) -> None:
        self.clock = clock
        self.burst_seconds = burst_seconds
        self.slack = slack
        self.per_minute = per_minute
        self._level = self.capacity if full else 0.0
        self._stamp = clock()

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        """The most the bucket holds: `burst_seconds` of the rate, or one request's worth and `slack` seconds."""
        return max(1.0 + self.rate * self.slack, self.rate * self.burst_seconds)

    def set_rate(self, per_minute: float) -> None:
        """Change the sustained rate, keeping what is already in the bucket."""
        self._refill()
        self.per_minute = per_minute
        self._level = min(self._level, self.capacity)

    def delay(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0 if now); a request larger than the bucket waits for a full one."""
        self._refill()
        need = min(amount, self.capacity)
        # The epsilon keeps float rounding from producing waits too small to move the clock.
        return 0.0 if self._level >= need - 1e-9 else (need - self._level) / self.rate

    def take(self, amount: float) -> None:
        """Spend `amount` (possibly going into debt)."""
        self._refill()
        self._level -= amount

    def drain(self, until: float | None = None) -> None:
        """Empty the bucket and let nothing accrue before `until` (after an overload: the provider's own window
        is full, so the pause must not save up a burst for the moment it ends)."""
        self._refill()
        self._level = min(self._level, 0.0)
        if until is not None:
            self._stamp = max(self._stamp, until)

    def give_back(self, amount: float) -> None:
        """Return `amount` (an over-estimate corrected after the reply)."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def _refill(self) -> None:
        now = self.clock()
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now
