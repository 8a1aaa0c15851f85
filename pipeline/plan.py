"""`--dry-run`: prepare the sink as a real run would, sort the rows through the same gate, make no API call."""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.options import RunOptions, resolve_endpoints
from pipeline.prepare import RowGate, Verdict, prepare_run
from pipeline.pricing import cost_of
from pipeline.prompt import Prompt
from pipeline.results import Row
from pipeline.stats import CallStats, RunStats
from pipeline.tokens import TokenEstimator


def dry_run(opts: RunOptions) -> str:
    """Check input, config and sink as a real run would, count the work, and make no API call."""
    try:
        resolve_endpoints(opts.api_key, opts.base_urls)
        key_note = "API key: found"
    except UsageError as exc:
        key_note = f"API key: MISSING: {exc.message}"
    prepared = prepare_run(opts, dry_run=True)
    prompt = Prompt(opts.config)
    estimator = TokenEstimator(opts.model, prompt.prefix)
    stats = RunStats(calls=CallStats(), model=opts.model)
    gate = RowGate(prepared.done, stats, opts.max_rows, redo=prepared.redo, shard=opts.shard)
    tokens, first = 0, None
    try:
        for batch in prepared.source.batches():
            for row in batch:
                if gate.sort(row) is Verdict.SEND:
                    tokens += estimator.prompt_tokens(row.text)
                    first = first or row
                    if gate.full:
                        break
            if gate.full:
                break
    finally:
        prepared.close()
    completion = gate.sent * min(opts.config.max_tokens, 12)
    cost = cost_of(opts.model, tokens, completion)
    lines = [
        f"dry run: {opts.input} → {opts.output} ({opts.model}, prompt {opts.config.prompt_fingerprint()})",
        f"  {gate.sent:,} rows to label, {len(prepared.done):,} already in the sink, "
        f"{stats.duplicates + stats.conflicts:,} repeated ids ({stats.conflicts:,} with different text), "
        f"{gate.problems:,} rows that would be dead-lettered (empty text, bad bytes, ragged)",
        *(
            [f"  shard {opts.shard.label}: {stats.other_shards:,} rows of the input belong to other shards"]
            if opts.shard
            else []
        ),
        f"  ~{tokens:,} prompt tokens{f' ≈ ${cost:.4f}' if cost is not None else ''} (estimate)",
        f"  {key_note}",
    ]
    if stats.changed or prepared.relabeled:
        what = "--relabel-changed labels them again" if opts.relabel_changed else "--relabel-changed would relabel"
        lines.append(f"  {max(stats.changed, prepared.relabeled):,} rows in the sink now have different text ({what})")
    lines.extend(f"  note: {note}" for note in prepared.notes)
    if first is not None:
        lines.extend(_first_request(prompt, first))
    return "\n".join(lines)


def _first_request(prompt: Prompt, row: Row) -> list[str]:
    lines = ["  first request:"]
    for message in prompt.messages(row.text):
        lines.append(f"    [{message['role']}] {message['content'][:300]}")
    return lines
