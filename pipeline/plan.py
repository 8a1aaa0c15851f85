"""`--dry-run`: check input, config and sink as a real run would, count the work, make no API call."""

from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.idset import IdSet
from pipeline.options import RunOptions, identity_of, open_source, resolve_credentials
from pipeline.progress import price_of
from pipeline.prompt import Prompt
from pipeline.sink import open_sink
from pipeline.tokens import TokenEstimator


def dry_run(opts: RunOptions) -> str:
    """Check input, config and sink as a real run would, count the work, and make no API call."""
    try:
        resolve_credentials(opts.api_key, opts.base_url)
        key_note = "API key: found"
    except UsageError as exc:
        key_note = f"API key: MISSING: {exc.message}"
    source = open_source(opts)
    sink = open_sink(opts.output)
    with source:
        done = IdSet() if opts.restart else sink.load_done(repair=False)
        prompt = Prompt(opts.config)
        if not opts.restart:
            sink.meta.check_identity(
                identity_of(opts, source), has_rows=len(done) > 0, force=opts.force, sink_name=str(opts.output)
            )
        estimator = TokenEstimator(opts.model, prompt.prefix)
        seen, todo, problems, duplicates, tokens, first = IdSet(), 0, 0, 0, 0, None
        for batch in source.batches():
            for row in batch:
                if row.id in done or not seen.add(row.id):
                    duplicates += row.id not in done
                    continue
                if opts.limit is not None and todo + problems >= opts.limit:
                    break
                if row.problem:
                    problems += 1
                    continue
                todo += 1
                tokens += estimator.prompt_tokens(row.text)
                first = first or row
    price = price_of(opts.model)
    completion = todo * min(opts.config.max_tokens, 12)
    cost = f" ≈ ${(tokens * price[0] + completion * price[1]) / 1e6:.4f}" if price else ""
    lines = [
        f"dry run: {opts.input} → {opts.output} ({opts.model}, prompt {opts.config.prompt_fingerprint()})",
        f"  {todo:,} rows to label, {len(done):,} already in the sink, {duplicates:,} repeated ids, "
        f"{problems:,} rows that would be dead-lettered (empty text, bad bytes, ragged)",
        f"  ~{tokens:,} prompt tokens{cost} (estimate)",
        f"  {key_note}",
    ]
    if first is not None:
        lines.append("  first request:")
        for message in prompt.messages(first.text):
            lines.append(f"    [{message['role']}] {message['content'][:300]}")
    return "\n".join(lines)
