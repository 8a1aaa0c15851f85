"""One rate limit for every actor of a Ray job: reservations from one small actor, a local window per actor.

    actor 1 ─┐  reserve(tokens) → "send in 0.12 s"       ┌──────────────┐
    actor 2 ─┼────────────────────────────────────────▶  │ SharedLimit  │  request and token schedules,
    actor N ─┘  pause(s) after a 429 · settle(est, used) └──────────────┘  one pause, the run's counters

Each actor keeps labelstream's own `Limiter` for its in-flight window (and the pacer behind it); before a
request leaves, it asks the `SharedLimit` for a send time. The shared limit schedules requests and tokens as
two virtual clocks (GCRA: a bucket expressed as "when is it empty again"), so a reservation is one short
call that never blocks the actor, whatever the other actors are waiting for. A 429 anywhere pauses every
later reservation; a reply's real token count settles the estimate reserved for it. The same actor tells
the Labelers which rows of a batch to label (`claim`): an id once per job, nothing once the run stops.

Limits an earlier run learned (`sinks/limit_memory.py`, read and written by the driver) start the schedule, as
they start the online limiter: limits given or announced by headers win over them. What this job learns (the
announced limits, and the rates the actors' own 429s taught them, summed) comes back in `totals()["learned"]`
for the driver to keep.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pipeline.input.ids import IdSet
from pipeline.ratelimit.buckets import Clock
from pipeline.ratelimit.headers import number, provider_view
from pipeline.ratelimit.limiter import DEFAULT_PAUSE, REQUEST_BURST, SAFETY, Limiter, LimitSettings, Permit, Sleep

TOKEN_BURST: Final = 1.0  # seconds of the token rate that may go out at once (the local bucket allows the same)
COUNTERS: Final = (
    "labeled",
    "failed",
    "retries",
    "rate_limited",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
)


class SharedLimit:
    """The schedule every actor reserves from (run as a Ray actor; plain Python so it can be tested alone)."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        remembered: Mapping[str, float] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.clock = clock
        self.remembered = dict(remembered or {})  # the key's figures an earlier run learned (limit_memory.py)
        self.given: tuple[float | None, float | None] = (rpm, tpm)
        self.announced: tuple[float | None, float | None] = (None, None)  # by the provider's headers
        self.rates: dict[str, float] = {}  # actor → the request rate its 429s taught it (requests/s)
        self.rpm, self.tpm = self._limits()
        self._requests_at = 0.0  # when the request schedule is empty again (its "theoretical arrival time")
        self._tokens_at = 0.0
        self.pause_until = 0.0
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.stopping = False
        self.seen = IdSet()  # every id an actor has claimed in this job

    def reserve(self, tokens: int) -> float:
        """Book one request of about `tokens` tokens; return the seconds the caller waits before sending it."""
        now = self.clock()
        send = max(now, self.pause_until)
        if self.rpm:
            send = max(send, self._requests_at - REQUEST_BURST)
        if self.tpm:
            send = max(send, self._tokens_at - TOKEN_BURST)
        if self.rpm:
            self._requests_at = max(self._requests_at, send) + 60 / (self.rpm * SAFETY)
        if self.tpm:
            self._tokens_at = max(self._tokens_at, send) + tokens * 60 / (self.tpm * SAFETY)
        return send - now

    def settle(self, estimated: int, used: int) -> None:
        """A reply showed what a request really cost: hand back (or take) the difference in tokens."""
        if self.tpm:
            self._tokens_at -= (estimated - used) * 60 / (self.tpm * SAFETY)

    def pause(self, seconds: float) -> None:
        """A 429: nobody sends for `seconds`."""
        self.pause_until = max(self.pause_until, self.clock() + seconds)

    def learn(self, rpm: float | None, tpm: float | None) -> None:
        """Limits read from a reply's headers: keep the lower of what is given and what the provider says."""
        self.announced = (rpm or self.announced[0], tpm or self.announced[1])
        self.rpm, self.tpm = self._limits()

    def learned_rate(self, actor: str, rate: float) -> None:
        """An actor's 429s taught it a request rate (its part of the key's, which is the sum over actors)."""
        self.rates[actor] = rate

    def _limits(self) -> tuple[float | None, float | None]:
        """RPM and TPM in force: the lower of given and announced; else what an earlier run learned (an RPM, or a
        rate its 429s taught, paced at exactly that rate)."""
        remembered = self.remembered
        rate = remembered.get("rate")
        rpm = _lower(self.given[0], self.announced[0]) or remembered.get("rpm") or (rate and rate * 60 / SAFETY)
        return rpm or None, _lower(self.given[1], self.announced[1]) or remembered.get("tpm")

    def learned(self) -> dict[str, float | None] | None:
        """The key's figures to remember for the next run, or None when this job learned nothing."""
        if not any(self.announced) and not self.rates:
            return None
        remembered = self.remembered
        return {
            "rpm": self.announced[0] or remembered.get("rpm"),
            "tpm": self.announced[1] or remembered.get("tpm"),
            "rate": sum(self.rates.values()) or remembered.get("rate"),
            "window": remembered.get("window"),
        }

    def stop(self) -> None:
        """The run is stopping (Ctrl-C): actors label no further batch; the rows already started finish."""
        self.stopping = True

    def claim(self, ids: Sequence[str]) -> list[bool]:
        """Which of a batch's rows to label: each id only the first time any actor shows it (an id repeated in
        the input is labeled once, as the run's RowGate does), and none once the run is stopping."""
        if self.stopping:
            return [False] * len(ids)
        return [self.seen.add(row_id) for row_id in ids]

    def add(self, counts: Mapping[str, int]) -> None:
        """Fold in one batch's counters (the driver reads the job's totals with `totals`)."""
        for name, value in counts.items():
            self.counters[name] = self.counters.get(name, 0) + value

    def totals(self) -> dict[str, Any]:
        """The job's counters so far, and the limits in force."""
        return {**self.counters, "rpm": self.rpm, "tpm": self.tpm, "learned": self.learned()}


class SharedLimiter(Limiter):
    """An actor's `Limiter`: its own window and pacer, and a send time from the `SharedLimit` actor.

    `remote` is the actor handle (its methods called as `remote.reserve.remote(...)`); `settings` carries
    this actor's window. Limits learned from headers go to the shared actor (the local limiter learns them too,
    for its window; the shared schedule is what keeps the job under them).
    """

    def __init__(
        self, settings: LimitSettings, remote: Any, *, clock: Clock = time.monotonic, sleep: Sleep | None = None
    ):
        super().__init__(settings, clock=clock, **({"sleep": sleep} if sleep else {}))
        self.remote = remote
        self._told: tuple[float | None, float | None] = (None, None)
        self._name = uuid.uuid4().hex  # this actor, to the shared actor that sums what the actors learned

    async def _take(self, estimated_tokens: int) -> Permit:
        permit = await super()._take(estimated_tokens)
        try:
            delay = await self.remote.reserve.remote(estimated_tokens)
            if delay > 1e-6:
                permit.window_limited = False  # the shared schedule held it, not the window
                await self.sleep(delay)
        except BaseException:
            self.in_flight -= 1  # the slot was never handed out
            raise
        permit.started = self.clock()
        return permit

    def on_success(self, permit: Permit) -> None:
        if permit.used_tokens is not None and permit.used_tokens != permit.estimated_tokens:
            self.remote.settle.remote(permit.estimated_tokens, permit.used_tokens)
        super().on_success(permit)

    def on_rate_limited(self, retry_after: float | None, *, refused: bool = True) -> None:
        super().on_rate_limited(retry_after, refused=refused)
        self.remote.pause.remote(retry_after if retry_after is not None and retry_after > 0 else DEFAULT_PAUSE)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        super().observe_headers(headers)
        view = provider_view(headers)
        limits = (number(view.get("x-ratelimit-limit-requests")), number(view.get("x-ratelimit-limit-tokens")))
        if any(limits) and limits != self._told:
            self._told = limits
            self.remote.learn.remote(*limits)

    def _keep(self) -> None:
        # What this actor's 429s taught it goes to the shared actor; the driver keeps the job's sum for the next run.
        if self.pacer.learned_rate:
            self.remote.learned_rate.remote(self._name, self.pacer.learned_rate)


def _lower(a: float | None, b: float | None) -> float | None:
    """The lower of two limits, either of which may be unknown."""
    return min(a or math.inf, b or math.inf) if a or b else None
