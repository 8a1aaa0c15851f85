"""`--dry-run`: prepare the sink as a real run would, sort the rows through the same gate, make no API call.

With `--procs N` the plan is the whole run's: each shard is planned as its child process would run it (its
part of --limit, its share of the key), and the parts are added up into one estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UsageError
from pipeline.results import Row
from pipeline.run.estimate import Estimate, combine_estimates, estimate_run
from pipeline.run.options import RunOptions, resolve_endpoints
from pipeline.run.prepare import prepare_run
from pipeline.run.procs import shard_options
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import Prompt


@dataclass(slots=True)
class _Part:
    """What one process of the run would do."""

    plan: Estimate
    stats: RunStats
    done: int
    changed: int
    notes: list[str] = field(default_factory=list)


def dry_run(opts: RunOptions, *, procs: int | None = None) -> str:
    """Check input, config and sink as a real run would, count the work and its cost, and make no API call;
    `procs`: for the run of `--procs N`, as one plan."""
    try:
        resolve_endpoints(opts.api_key, opts.base_urls)
        key_note = "API key: found"
    except UsageError as exc:
        key_note = f"API key: MISSING: {exc.message}"
    parts = [_plan(part) for part in (shard_options(opts, procs) if procs else [opts])]
    plan = combine_estimates([p.plan for p in parts])
    stats = [p.stats for p in parts]
    duplicates, conflicts = sum(s.duplicates for s in stats), sum(s.conflicts for s in stats)
    where = f", {procs} shard processes" if procs else ""
    lines = [
        f"dry run: {opts.input} → {opts.output} ({opts.model}, prompt {opts.config.prompt_fingerprint()}{where})",
        f"  {plan.rows:,} rows to label, {sum(p.done for p in parts):,} already in the sink, "
        f"{duplicates + conflicts:,} repeated ids ({conflicts:,} with different text), "
        f"{plan.problems:,} rows that would be dead-lettered (empty text, bad bytes, ragged)",
        *(
            [f"  shard {opts.shard.label}: {stats[0].other_shards:,} rows of the input belong to other shards"]
            if opts.shard
            else []
        ),
        *plan.render(),
    ]
    if plan.copies:
        saving = f", ≈ ${plan.copy_saving:.4f}" if plan.copy_saving is not None else ""
        batch = plan.costs.get("batch")  # --engine batch dedupes too, at batch prices
        saving += f" (batch ≈ ${batch * plan.copies / max(1, plan.rows):.4f})" if saving and batch is not None else ""
        lines.append(
            f"  dedupe: {plan.copies:,} more rows repeat a text sent once (copied, no request): "
            f"{plan.copies:,} requests saved{saving} (--no-dedupe sends them)"
        )
    if opts.max_cost is not None and plan.cost is not None:
        verdict = "over it: the run would refuse to start" if plan.cost > opts.max_cost else "within it"
        split = f" (split over the {procs} shards by their estimates: each stops at its part)" if procs else ""
        lines.append(f"  --max-cost ${opts.max_cost:g}{split}: {verdict}")
    lines.append(f"  {key_note}")
    if changed := sum(p.changed for p in parts):
        what = "--relabel-changed labels them again" if opts.relabel_changed else "--relabel-changed would relabel"
        lines.append(f"  {changed:,} rows in the sink now have different text ({what})")
    lines.extend(f"  note: {note}" for note in dict.fromkeys(n for p in parts for n in p.notes))
    if plan.first is not None:
        lines.extend(_first_request(Prompt(opts.config), plan.first))
    return "\n".join(lines)


def _plan(opts: RunOptions) -> _Part:
    prepared = prepare_run(opts, dry_run=True)
    stats = RunStats(calls=CallStats(), model=opts.model)
    try:
        # A dry run may spend a second loading the exact tokenizer; a run only does so with --exact-tokens.
        plan = estimate_run(opts, prepared, exact=True, stats=stats, reuse_source=True)
    finally:
        prepared.close()
    changed = max(stats.changed, prepared.relabeled)
    return _Part(plan, stats, len(prepared.done), changed, prepared.notes)


def _first_request(prompt: Prompt, row: Row) -> list[str]:
    lines = ["  first request:"]
    for message in prompt.messages(row.text):
        lines.append(f"    [{message['role']}] {message['content'][:300]}")
    return lines
