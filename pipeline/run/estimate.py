"""What a run will cost before it starts: rows, tokens, dollars per service tier, and time at the limits in force.

Shared by `--dry-run` (which shows it) and `--max-cost` (which refuses to start above it). Prompt tokens are
counted exactly with `bpe-openai` when asked and installed, else estimated from characters and scaled by what
the provider reported in the sink's last run; completion tokens come from the rows already in the sink, else
from the shape of the answer. The figure compared with `--max-cost` assumes no prompt caching (an upper bound
for the prompt side).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.api.pricing import TIERS, PriceTable, load_prices
from pipeline.api.tokens import TokenEstimator, encoding_name, estimate
from pipeline.ratelimit.limiter import SAFETY, START_WINDOW, LimitSettings
from pipeline.results import Row
from pipeline.run.options import RunOptions
from pipeline.run.prepare import Prepared, RowGate, Verdict, open_source
from pipeline.sinks import Sink
from pipeline.sinks.progress_file import read_progress
from pipeline.stats import CallStats, RunStats, short_duration
from pipeline.task.prompt import Prompt

# Rows of the sink read for its latency and completion sizes: enough for a median, cheap on any sink.
_HISTORY_ROWS = 10_000
_ASSUMED_LATENCY_S = 1.0
CACHE_MIN_TOKENS = 1024  # OpenAI caches a shared prompt prefix from this length on, in steps of 128


@dataclass(frozen=True, slots=True)
class History:
    """What the sink's earlier runs tell about this one: latency, reply size, the provider's token count."""

    rows: int = 0
    latency_s: float | None = None
    completion_tokens: float | None = None
    token_scale: float | None = None  # provider tokens per estimated token, from the last run


def read_history(sink: Sink) -> History:
    """Median latency and mean completion tokens of the sink's first rows, and the last run's token scale."""
    latencies: list[float] = []
    completions: list[int] = []
    with contextlib.suppress(Exception):  # history only sharpens an estimate; an unreadable sink gives none
        for i, item in enumerate(sink.iter_records(columns=["latency_ms", "completion_tokens"])):
            if i >= _HISTORY_ROWS:
                break
            if isinstance(item.get("latency_ms"), int | float):
                latencies.append(float(item["latency_ms"]))
            if isinstance(item.get("completion_tokens"), int):
                completions.append(item["completion_tokens"])
    value = (read_progress(sink.meta.progress_path) or {}).get("token_scale")
    scale = float(value) if isinstance(value, int | float) and value > 0 else None
    return History(
        rows=len(completions),
        latency_s=statistics.median(latencies) / 1000 if latencies else None,
        completion_tokens=statistics.fmean(completions) if completions else None,
        token_scale=scale,
    )


@dataclass(slots=True)
class Estimate:
    """The work a run would do and what it would cost; `costs` maps tier → USD (None: no price or not offered)."""

    model: str
    rows: int = 0
    problems: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_tokens: int = 0  # the shared part of every prompt
    prompt_method: str = ""
    completion_method: str = ""
    costs: dict[str, float | None] = field(default_factory=dict)
    cached_cost: float | None = None  # standard tier, the shared prefix cached after the first request
    seconds: float | None = None
    time_bound: str = ""
    prices: PriceTable | None = None
    first: Row | None = None  # the first row the run would send
    copies: int = 0  # rows that copy the record of an identical text instead of a request (run/dedupe.py)

    @property
    def copy_saving(self) -> float | None:
        """USD the copies save: as much per copy as a sent row costs on average (standard tier)."""
        return None if self.cost is None else self.cost * self.copies / max(1, self.rows)

    @property
    def cost(self) -> float | None:
        """The standard-tier cost, without prompt caching: what --max-cost is compared with."""
        return self.costs.get("standard")

    def render(self) -> list[str]:
        """Lines for the dry run."""
        tokens = f"~{self.prompt_tokens:,} prompt + ~{self.completion_tokens:,} completion tokens"
        lines = [f"  {tokens}", f"    prompt: {self.prompt_method}", f"    completion: {self.completion_method}"]
        if self.cost is None:
            lines.append(f"  cost: no price for {self.model} in the price table (tokens above are still counted)")
        else:
            shown = [f"{tier} ${c:.4f}" if c is not None else f"{tier} not offered" for tier, c in self.costs.items()]
            lines.append(f"  cost: {', '.join(shown)} (online = standard; no prompt caching assumed)")
            if self.cached_cost is not None:
                lines.append(
                    f"    with the {self.prefix_tokens:,}-token shared prefix served from the provider's prompt cache: "
                    f"≈ ${self.cached_cost:.4f}"
                )
        if self.prices is not None:
            lines.append(f"    {self.prices.provenance}")
        if self.seconds is not None:
            lines.append(f"  expected time: ~{short_duration(self.seconds)} ({self.time_bound})")
        return lines


def estimate_run(
    opts: RunOptions, prepared: Prepared, *, exact: bool, stats: RunStats | None = None, reuse_source: bool = False
) -> Estimate:
    """Read the input once through the run's gate and estimate tokens, cost and time (no API call).

    `exact` tries the model's BPE from bpe-openai; `stats` receives the gate's counts (repeats, conflicts);
    `reuse_source` reads the prepared source itself (a dry run), else a fresh reader leaves it for the run.
    """
    prompt = Prompt(opts.config)
    history = read_history(prepared.sink)
    counter = TokenEstimator(opts.model, prompt.prefix)
    if exact and (loader := counter.load_exact()) is not None:
        loader.join()
    if not counter.exact and history.token_scale:
        counter.scale = history.token_scale
    stats = stats if stats is not None else RunStats(calls=CallStats(), model=opts.model)
    copies = prepared.plan_dedupe(opts) if opts.dedupe else None
    gate = RowGate(prepared.done, stats, opts.max_rows, redo=prepared.redo, shard=opts.shard, dedupe=copies)
    result = Estimate(model=opts.model)
    source = prepared.source if reuse_source else open_source(opts)
    if not reuse_source:
        source.open()
    try:
        for batch in source.batches():
            for row in batch:
                if gate.classify(row) is Verdict.SEND:
                    result.prompt_tokens += counter.prompt_tokens(row.text)
                    result.first = result.first or row
                    if gate.full:
                        break
            if gate.full:
                break
    finally:
        if not reuse_source:
            source.close()
    result.rows, result.problems, result.copies = gate.sent, gate.problems, gate.copies
    result.prefix_tokens = counter.prompt_tokens("")
    result.prompt_method = _prompt_method(counter, opts.model, exact, history)
    per_row, result.completion_method = _completion(prompt, history)
    result.completion_tokens = round(per_row * gate.sent)
    _price(result)
    _time(result, opts.limits, history, per_request=result.prompt_tokens / max(1, gate.sent) + opts.config.max_tokens)
    return result


def combine_estimates(parts: Sequence[Estimate]) -> Estimate:
    """One estimate for processes that run side by side (`--procs`): work and costs added up, the longest time."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    total = Estimate(
        model=first.model,
        rows=sum(p.rows for p in parts),
        problems=sum(p.problems for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
        prefix_tokens=first.prefix_tokens,
        prompt_method=first.prompt_method,
        completion_method=first.completion_method,
        costs={tier: _sum([p.costs.get(tier) for p in parts]) for tier in first.costs},
        cached_cost=_sum([p.cached_cost for p in parts]),
        prices=first.prices,
        first=next((p.first for p in parts if p.first is not None), None),
        copies=sum(p.copies for p in parts),
    )
    slowest = max(parts, key=lambda p: p.seconds or 0.0)
    total.seconds = slowest.seconds
    total.time_bound = f"{slowest.time_bound}; the shards run side by side" if slowest.time_bound else ""
    return total


def _sum(values: Sequence[float | None]) -> float | None:
    """The sum, or None when any part is unknown (no price, or the tier not offered)."""
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _prompt_method(counter: TokenEstimator, model: str, exact: bool, history: History) -> str:
    if counter.exact:
        return f"exact, counted with bpe-openai ({encoding_name(model)})"
    why = (
        "bpe-openai is not installed or has no encoding for this model"
        if exact
        else "pass --exact-tokens for an exact count with bpe-openai"
    )
    if history.token_scale:
        return f"calibrated estimate: characters scaled ×{history.token_scale:.2f} by the last run's usage ({why})"
    return f"character estimate, not yet calibrated by a run ({why})"


def _completion(prompt: Prompt, history: History) -> tuple[float, str]:
    cfg = prompt.config
    if history.completion_tokens is not None:
        per_row = history.completion_tokens
        return per_row, f"{per_row:.1f} a row, as in the {history.rows:,} rows already in the sink"
    # The shortest complete answer with the longest label; extra output fields get a guess each.
    longest = max(cfg.labels, key=len)
    answer = orjson.dumps({prompt.field: [longest] if cfg.multi_label else longest}).decode()
    extra = sum(_field_guess(f.schema) for f in cfg.outputs)
    per_row = min(cfg.max_tokens, estimate(answer) + extra + 1)
    return per_row, f"~{per_row:g} a row from the answer's shape (max_tokens {cfg.max_tokens} at most)"


def _field_guess(schema: Mapping[str, Any]) -> int:
    kind = schema.get("type")
    if kind == "string":
        return min(int(schema.get("maxLength", 120)) // 4, 40) + 4
    return 6 if kind == "array" else 4


def _price(result: Estimate) -> None:
    table = load_prices()
    result.prices = table
    price = table.price_of(result.model)
    for tier in TIERS:
        result.costs[tier] = (
            None if price is None else price.cost(result.prompt_tokens, result.completion_tokens, tier=tier)
        )
    if price is not None and result.prefix_tokens >= CACHE_MIN_TOKENS and result.rows > 1:
        cached = (result.prefix_tokens // 128 * 128) * (result.rows - 1)
        result.cached_cost = price.cost(result.prompt_tokens, result.completion_tokens, cached_tokens=cached)


def _time(result: Estimate, limits: LimitSettings, history: History, *, per_request: float) -> None:
    if result.rows == 0:
        result.seconds, result.time_bound = 0.0, "nothing to label"
        return
    latency = history.latency_s
    seen = f"~{latency:.2f} s a request, as in the sink" if latency else f"assuming ~{_ASSUMED_LATENCY_S:g} s a request"
    latency = latency or _ASSUMED_LATENCY_S
    if limits.auto:
        trips = _round_trips(result.rows, START_WINDOW, limits.concurrency)
        bounds = [(trips * latency, f"auto concurrency from {START_WINDOW} up to {limits.concurrency}, {seen}")]
    else:
        trips = math.ceil(result.rows / limits.concurrency)
        bounds = [(trips * latency, f"--concurrency {limits.concurrency}, {seen}")]
    # A process paces at its share of the key (--rate-share, 1/N for shards).
    if limits.rpm:
        rpm = limits.rpm * limits.share
        bounds.append((result.rows / (rpm * SAFETY) * 60, f"--rpm {limits.rpm:g}" + _share(limits.share)))
    if limits.tpm:
        tpm = limits.tpm * limits.share
        bounds.append((result.rows * per_request / (tpm * SAFETY) * 60, f"--tpm {limits.tpm:g}" + _share(limits.share)))
    seconds, bound = max(bounds)
    note = "" if limits.rpm or limits.tpm else "; the provider's own rate limits may make it slower"
    result.seconds, result.time_bound = seconds, f"bound by {bound}{note}"


def _share(share: float) -> str:
    return "" if share == 1.0 else f" at a share of {share:.3g}"


def _round_trips(rows: int, start: int, ceiling: int) -> int:
    """Round trips to label `rows` with a window that doubles each trip from `start` up to `ceiling` (slow start)."""
    trips, window = 0, start
    while rows > 0:
        rows -= window
        trips += 1
        window = min(ceiling, window * 2)
    return trips
