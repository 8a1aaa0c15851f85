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
from pipeline.run import summary
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
    if settings.online_rows and not Ledger(open_meta(opts.output, opts.shard)).submissions:
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
    """One summary for the online slice and the batch run that followed it: the two parts added up as for shards
    (`pipeline.run.summary.combine`), then what is auto's own."""
    both = summary.combine(
        [online, batched],
        output=batched.output,
        dead_letters=batched.dead_letters,
        resume=batched.resume_command,
        elapsed_s=online.elapsed_s + batched.elapsed_s,  # one after the other
        max_cost=online.max_cost,  # the whole run's cap (the batches had what the slice left of it)
    )
    return dataclasses.replace(
        both,
        # The batch run read the whole input again: the online slice's rows were this run's work, not an earlier
        # run's, and rows edited since their label are counted by it alone.
        skipped_done=max(0, batched.skipped_done - online.saved),
        changed=batched.changed,
        engine="auto",
        tier=online.tier,
        shard=batched.shard,
        other_shards=batched.other_shards,
    )
