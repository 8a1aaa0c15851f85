"""`labelstream label --engine auto`: check the prompt online on a first slice, then send the rest as batches.

The first `online_rows` rows go through the online engine, so a prompt or model that does not work shows in
a minute rather than after a day, and their real token use prices the rest. Then the batch engine sends every
row still to do, into the same sink. Once a sink has batches (a later run, after --no-wait), auto goes
straight to the batch engine. The summary compares the cost with what an all-online run would have paid.
The two parts are two runs (`pipeline.run.lifecycle.Run`) of one sink, one after the other.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import IO, Any, Final

from pipeline.api.pricing import cost_of
from pipeline.engines.batch.engine import BatchEngine
from pipeline.engines.batch.ledger import Ledger
from pipeline.engines.batch.settings import BatchSettings
from pipeline.engines.online import OnlineEngine
from pipeline.errors import BatchError
from pipeline.run.lifecycle import Run
from pipeline.run.options import RunOptions
from pipeline.run.summary import Summary
from pipeline.sinks import open_meta

# More of the online slice failing than this stops the run before any batch is sent.
MAX_FAILED_SHARE: Final = 0.2


async def run(opts: RunOptions, *, notice: IO[str] | None = None, **settings: Any) -> Summary:
    """Label `batch.online_rows` rows online, then the rest through the Batch API; one combined summary."""
    return await run_auto(opts, settings.get("batch") or BatchSettings(), notice=notice)


async def run_auto(opts: RunOptions, settings: BatchSettings, *, notice: IO[str] | None = None) -> Summary:
    """Label `settings.online_rows` rows online, then the rest through the Batch API; one combined summary."""
    notice = notice or sys.stderr
    online: Summary | None = None
    if settings.online_rows and not Ledger(open_meta(opts.output)).submissions:
        first = settings.online_rows if opts.max_rows is None else min(settings.online_rows, opts.max_rows)
        online = await Run(dataclasses.replace(opts, max_rows=first), OnlineEngine(), notice=notice).execute()
        _check_online(online, opts)
        _say_estimate(online, opts, notice)
    left = None if opts.max_rows is None or online is None else opts.max_rows - online.labeled - online.failed
    if left is not None and left <= 0 and online is not None:
        return dataclasses.replace(online, engine="auto")
    batch_opts = dataclasses.replace(opts, max_rows=left if left is not None else opts.max_rows, service_tier=None)
    if opts.max_cost is not None and online is not None:
        # One cap for the whole run: the batches get what the online slice left of it.
        batch_opts = dataclasses.replace(batch_opts, max_cost=max(0.0, opts.max_cost - (online.cost_usd or 0.0)))
    batched = await Run(batch_opts, BatchEngine(settings), notice=notice).execute()
    return batched if online is None else combine(online, batched)


def _check_online(online: Summary, opts: RunOptions) -> None:
    finished = online.labeled + online.failed
    if finished and online.failed / finished > MAX_FAILED_SHARE:
        kinds = ", ".join(f"{kind} ×{n}" for kind, n in sorted(online.failures.items(), key=lambda kv: -kv[1])[:3])
        raise BatchError(
            f"{online.failed} of the first {finished} rows failed online ({kinds}); no batch was sent. Fix the "
            f"prompt or the model first: the failures are in {online.dead_letters}. Then re-run the same command."
        )


def _say_estimate(online: Summary, opts: RunOptions, notice: IO[str]) -> None:
    if opts.progress == "off" or not online.labeled:
        return
    prompt = online.prompt_tokens / online.labeled
    completion = online.completion_tokens / online.labeled
    per_1k = cost_of(opts.model, round(prompt * 1000), round(completion * 1000), tier="batch")
    price = f"; ≈ ${per_1k:.4f} per 1,000 rows at batch prices" if per_1k is not None else ""
    print(
        f"labelstream: online check passed: {online.labeled:,} rows labeled, {online.failed:,} failed, "
        f"{prompt:.0f} prompt + {completion:.0f} completion tokens a row{price}. Sending the rest as batches.",
        file=notice,
        flush=True,
    )


def combine(online: Summary, batched: Summary) -> Summary:
    """One summary for the online slice and the batch run that followed it."""

    def total(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a + b

    failures = dict(online.failures)
    for kind, n in batched.failures.items():
        failures[kind] = failures.get(kind, 0) + n
    samples = {k: list(v) for k, v in online.samples.items()}
    for kind, found in batched.samples.items():
        samples[kind] = (samples.get(kind, []) + found)[:3]
    return dataclasses.replace(
        batched,
        labeled=online.labeled + batched.labeled,
        failed=online.failed + batched.failed,
        saved=online.saved + batched.saved,
        # The batch run found the online slice in the sink; it was this run's work, not an earlier one's.
        skipped_done=max(0, batched.skipped_done - online.saved),
        truncated=online.truncated + batched.truncated,
        copies=online.copies + batched.copies,  # the CLI turns dedupe off for auto (docs/dedupe.md)
        copy_saving_usd=total(online.copy_saving_usd, batched.copy_saving_usd),
        hedged=online.hedged + batched.hedged,
        timeouts=online.timeouts + batched.timeouts,
        abandoned=online.abandoned + batched.abandoned,
        abandoned_cost_usd=total(online.abandoned_cost_usd, batched.abandoned_cost_usd),
        unusable_replies=online.unusable_replies + batched.unusable_replies,
        unusable_tokens=online.unusable_tokens + batched.unusable_tokens,
        retries=online.retries + batched.retries,
        rate_limited=online.rate_limited + batched.rate_limited,
        unavailable=online.unavailable + batched.unavailable,
        elapsed_s=round(online.elapsed_s + batched.elapsed_s, 2),
        prompt_tokens=online.prompt_tokens + batched.prompt_tokens,
        completion_tokens=online.completion_tokens + batched.completion_tokens,
        cost_usd=total(online.cost_usd, batched.cost_usd),
        standard_cost_usd=total(online.standard_cost_usd, batched.standard_cost_usd),
        failures=failures,
        samples=samples,
        engine="auto",
        tier=online.tier,
    )
