"""`--dry-run`: prepare the sink as a real run would, sort the rows through the same gate, make no API call."""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.results import Row
from pipeline.run.estimate import estimate_run
from pipeline.run.options import RunOptions, resolve_endpoints
from pipeline.run.prepare import prepare_run
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import Prompt


def dry_run(opts: RunOptions) -> str:
    """Check input, config and sink as a real run would, count the work and its cost, and make no API call."""
    try:
        resolve_endpoints(opts.api_key, opts.base_urls)
        key_note = "API key: found"
    except UsageError as exc:
        key_note = f"API key: MISSING: {exc.message}"
    prepared = prepare_run(opts, dry_run=True)
    stats = RunStats(calls=CallStats(), model=opts.model)
    try:
        # A dry run may spend a second loading the exact tokenizer; a run only does so with --exact-tokens.
        plan = estimate_run(opts, prepared, exact=True, stats=stats, reuse_source=True)
    finally:
        prepared.close()
    lines = [
        f"dry run: {opts.input} → {opts.output} ({opts.model}, prompt {opts.config.prompt_fingerprint()})",
        f"  {plan.rows:,} rows to label, {len(prepared.done):,} already in the sink, "
        f"{stats.duplicates + stats.conflicts:,} repeated ids ({stats.conflicts:,} with different text), "
        f"{plan.problems:,} rows that would be dead-lettered (empty text, bad bytes, ragged)",
        *(
            [f"  shard {opts.shard.label}: {stats.other_shards:,} rows of the input belong to other shards"]
            if opts.shard
            else []
        ),
        *plan.render(),
    ]
    if opts.max_cost is not None and plan.cost is not None:
        verdict = "over it: the run would refuse to start" if plan.cost > opts.max_cost else "within it"
        lines.append(f"  --max-cost ${opts.max_cost:g}: {verdict}")
    lines.append(f"  {key_note}")
    if stats.changed or prepared.relabeled:
        what = "--relabel-changed labels them again" if opts.relabel_changed else "--relabel-changed would relabel"
        lines.append(f"  {max(stats.changed, prepared.relabeled):,} rows in the sink now have different text ({what})")
    lines.extend(f"  note: {note}" for note in prepared.notes)
    if plan.first is not None:
        lines.extend(_first_request(Prompt(opts.config), plan.first))
    return "\n".join(lines)


def _first_request(prompt: Prompt, row: Row) -> list[str]:
    lines = ["  first request:"]
    for message in prompt.messages(row.text):
        lines.append(f"    [{message['role']}] {message['content'][:300]}")
    return lines
