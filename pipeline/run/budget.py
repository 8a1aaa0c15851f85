"""`--max-cost`: this run's spending, checked before every request so that it never passes the limit.

Spend is what every reply cost by its `usage` (cached prompt tokens at the cached price), unusable replies
included since they are billed too, plus the worst case of every abandoned attempt (it may still run upstream),
plus, for every request in flight (hedge copies too), the most it may cost: its prompt estimate and a full
`max_tokens` reply. A row whose worst case would take the total past the limit is not sent; the run then stops the
way Ctrl-C stops it (in-flight requests finish, the sink is flushed), and the next run resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import IO

from pipeline.api.pricing import Price, load_prices
from pipeline.errors import OverBudget, UsageError
from pipeline.run.estimate import estimate_run
from pipeline.run.options import RunOptions
from pipeline.run.prepare import Prepared, prepare_run
from pipeline.stats import CallStats


def price_for_budget(model: str, tier: str = "standard") -> Price:
    """The model's price, or a UsageError: a budget needs one."""
    table = load_prices()
    price = table.price_of(model)
    if price is None or price.factor(tier) is None:
        where = table.path or "configs/prices.toml"
        raise UsageError(
            f"--max-cost needs a price for {model} ({tier} tier), and {where} has none. Add the model to the price "
            "table (or pass --prices FILE), or leave out --max-cost."
        )
    return price


class Budget:
    """Spending of one run against its limit; `reserve` before a request, `settle` when its row is finished."""

    def __init__(
        self,
        limit: float,
        price: Price,
        prompt_tokens: Callable[[str], int],
        max_tokens: int,
        calls: CallStats,
        *,
        tier: str = "standard",
    ) -> None:
        self.limit = limit
        self.price = price
        self.tier = tier
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.calls = calls  # the client's counters: one owner of what was spent
        self.held = 0.0  # the worst case of the requests in flight
        self.stopped = False  # a row was held back: the run is stopping at the limit

    def reserve(self, text: str, *, max_tokens: int | None = None, stop: bool = True) -> float | None:
        """Hold the most a request for `text` may cost, or return None (and stop, unless `stop` is False: a hedge
        copy the run can do without) when that would pass the limit."""
        worst = self.price.cost(self.prompt_tokens(text), max_tokens or self.max_tokens, tier=self.tier) or 0.0
        if self.spent + self.held + worst > self.limit:
            self.stopped = self.stopped or stop
            return None
        self.held += worst
        return worst

    @property
    def spent(self) -> float:
        """USD spent so far: every reply by its usage, and the worst case of every abandoned attempt."""
        calls = self.calls
        cost = self.price.cost(
            calls.prompt_tokens + calls.abandoned_prompt_tokens,
            calls.completion_tokens + calls.abandoned_completion_tokens,
            tier=self.tier,
            cached_tokens=calls.cached_tokens,
        )
        return cost or 0.0

    def settle(self, held: float) -> None:
        """Release what `reserve` held for a row once it is finished (its attempts are in `spent` by then)."""
        self.held = max(0.0, self.held - held)

    def error(self, resume: str) -> OverBudget:
        """The error a run stopped by the limit ends with."""
        return OverBudget(
            # `held` stays with the requests a batch or a Ray job was given: their worst case, not yet settled.
            f"stopped at --max-cost ${self.limit:g}: spent up to ${self.spent + self.held:.4f}, and the next request "
            "could pass it. "
            "Every finished row is saved; the rest are left for the next run. To continue, raise --max-cost (it "
            f"counts each run's own spending) and re-run: {resume}"
        )


def refuse_over_estimate(estimate: float, limit: float, rows: int, how: str) -> OverBudget:
    """The error for a run whose estimate is already over the limit (nothing was sent)."""
    return OverBudget(
        f"the estimated cost of this run, ${estimate:.4f} for {rows:,} rows ({how}), exceeds --max-cost ${limit:g}; "
        "nothing was sent. Raise --max-cost, label part of the input with --limit N, or see --dry-run for the details."
    )


def check_before_start(
    opts: RunOptions, prepared: Prepared, notice: IO[str], *, tier: str = "standard"
) -> Price | None:
    """With --max-cost: the model's price, after refusing a run whose estimate (at `tier`) is already over it."""
    if opts.max_cost is None:
        return None
    price = price_for_budget(opts.model, tier)
    plan = estimate_run(opts, prepared, exact=opts.exact_tokens)
    cost = plan.costs.get(tier, plan.cost)
    if cost is not None and cost > opts.max_cost:
        raise refuse_over_estimate(cost, opts.max_cost, plan.rows, plan.prompt_method)
    if opts.progress != "off":
        print(
            f"labelstream: estimated ${cost or 0:.4f} for {plan.rows:,} rows: within --max-cost ${opts.max_cost:g}",
            file=notice,
        )
    return price


_IDLE_PART = 1e-9  # USD: the part of a process with no estimated cost (less than any request)


def split_budget(limit: float | None, parts: Sequence[RunOptions], notice: IO[str]) -> list[float | None]:
    """--max-cost over the processes of one run (`--procs N`, `parts` their options): each its part, in proportion
    to its estimated cost; the whole run is refused first when its estimate is over the limit.

    Each process then keeps its own spending under its part with the guarantees of one run (requests in flight
    at their worst case), so the run's total stays under the limit with no coordination between processes. In
    proportion, so that a shard with more rows left is not refused (or stopped early) while others have room,
    and so that a process's own check (its estimate against its part) passes exactly when the run's does.
    Reading the siblings' spending from their progress files instead would race: two shards reading each
    other's totals a second old could both spend the same remaining dollars.
    """
    if limit is None:
        return [None] * len(parts)
    price_for_budget(parts[0].model)
    plans = []
    for opts in parts:
        prepared = prepare_run(opts, dry_run=True)
        try:
            plans.append(estimate_run(opts, prepared, exact=opts.exact_tokens))
        finally:
            prepared.close()
    costs = [plan.cost or 0.0 for plan in plans]
    total = sum(costs)
    if total > limit:
        raise refuse_over_estimate(total, limit, sum(p.rows for p in plans), plans[0].prompt_method)
    if parts[0].progress != "off":
        rows = sum(p.rows for p in plans)
        print(f"labelstream: estimated ${total:.4f} for {rows:,} rows: within --max-cost ${limit:g}", file=notice)
    if total <= 0:
        return [limit / len(parts)] * len(parts)
    # A shard with nothing to pay for (all done, or only unusable rows) still runs, and --max-cost must be > 0.
    # Rounded down to a pico-dollar, so that the parts never add up past the limit.
    busy = limit - _IDLE_PART * costs.count(0.0)
    return [math.floor(busy * cost / total * 1e12) / 1e12 if cost else _IDLE_PART for cost in costs]
