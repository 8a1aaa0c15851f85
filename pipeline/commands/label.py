"""`labelstream label`: the flags of a labeling run, mapped to RunOptions in one place, and the run itself."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.label_flags import add_label_flags
from pipeline.commands.signals import interrupt_on_term
from pipeline.engines.batch.settings import MAX_REQUESTS
from pipeline.errors import ExitCode, UsageError


def register(sub: Any) -> None:
    """Add the `label` subcommand."""
    label = sub.add_parser("label", help="label a CSV into a JSONL or Parquet sink (resumes what it holds)")
    add_label_flags(label)
    label.set_defaults(handler=run, label_parser=label)


def _run_options(args: argparse.Namespace, argv: Sequence[str]) -> Any:
    """RunOptions from the `label` flags: the one place that maps flags to options."""
    from pipeline.input.location import default_output  # noqa: PLC0415
    from pipeline.input.shards import parse_shard  # noqa: PLC0415
    from pipeline.ratelimit.limiter import LimitSettings  # noqa: PLC0415
    from pipeline.run.options import RunOptions  # noqa: PLC0415
    from pipeline.task.config import load_config  # noqa: PLC0415 - commands load what they need

    if args.prices is not None:
        from pipeline.api.pricing import PRICES_ENV, load_prices  # noqa: PLC0415

        # Through the environment, so that every process of the run (and a resume hint's) reads the same table.
        os.environ[PRICES_ENV] = str(args.prices.resolve())
        load_prices()  # a missing or broken file is a usage error now, not at the first cost shown
    config = load_config(args.config)
    # with_overrides skips None; --id-column '' switches to content-hash ids.
    config = config.with_overrides(model=args.model, text_column=args.text_column, id_column=args.id_column)
    max_rows = args.limit
    if args.mode == "test":
        if max_rows is not None and max_rows != 50:
            raise UsageError("--mode test means --limit 50; pass one of them.")
        max_rows = 50
    if args.relabel_changed and not args.skip_labeled:
        raise UsageError("--relabel-changed resumes a sink; --skip_labeled False starts over. Pass one of them.")
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None and args.procs:
        raise UsageError("--procs N starts shards 0 … N-1 itself; pass --shard or --procs, not both.")
    if args.concurrency == "auto":
        limits = LimitSettings.automatic(rpm=args.rpm, tpm=args.tpm)
    else:
        limits = LimitSettings(concurrency=int(args.concurrency), rpm=args.rpm, tpm=args.tpm)
    urls = args.base_url or []
    output = Path(args.output) if args.output else default_output(args.input)
    return RunOptions.build(
        args.input,
        output,
        config,
        input_format=args.input_format,
        encoding=args.encoding,
        delimiter=args.delimiter,
        require_id_column=bool(args.id_column),
        checkpoint_rows=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        limits=limits,
        rate_share=args.rate_share,
        timeout=args.timeout,
        max_retries=args.max_retries,
        base_url=urls[0] if len(urls) == 1 else tuple(urls) or None,
        max_rows=max_rows,
        force=args.force,
        restart=not args.skip_labeled,
        relabel_changed=args.relabel_changed,
        dedupe=args.dedupe,
        dedupe_match=args.dedupe_match,
        progress="off" if args.quiet else "log" if args.no_progress else "auto",
        grace_seconds=args.grace,
        exact_tokens=args.exact_tokens,
        max_cost=args.max_cost,
        review_below=args.review_below,
        command=_resume_command(argv, output),
        service_tier=args.service_tier,
        shard=shard,
    )


def _check_engine_flags(args: argparse.Namespace) -> None:
    """Refuse engine flags that make no sense together, saying what to do instead."""
    if args.engine in ("online", "ray") and (args.no_wait or args.batch_size or args.retry_refused):
        raise UsageError("--no-wait, --batch-size and --retry-refused are for --engine batch or auto; add one of them.")
    if args.engine == "ray" and args.procs:
        raise UsageError("--engine ray spreads the rows over Ray's actors itself; drop --procs (see --ray-actors).")
    if args.engine == "batch" and args.service_tier:
        raise UsageError("--service-tier applies to online requests; the Batch API has its own (half) price. Drop it.")
    if args.batch_size and args.batch_size > MAX_REQUESTS:
        raise UsageError(f"--batch-size may be at most {MAX_REQUESTS:,} (the Batch API's limit per batch).")


def batch_settings(args: argparse.Namespace) -> Any:
    """BatchSettings from the `label` flags."""
    from pipeline.engines.batch.settings import BatchSettings  # noqa: PLC0415 - commands load what they need

    return BatchSettings(
        wait=not args.no_wait,
        poll_seconds=args.poll_interval,
        poll_max_seconds=max(60.0, args.poll_interval),
        max_requests=args.batch_size or MAX_REQUESTS,
        online_rows=args.online_rows,
        retry_refused=args.retry_refused,
    )


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Label (or, with --dry-run, plan) a run; the exit code of its summary."""
    import asyncio  # noqa: PLC0415 - commands load what they need

    _check_engine_flags(args)
    opts = _run_options(args, argv)
    if args.procs and args.procs > 1:
        return _run_procs(args, opts)
    if args.dry_run:
        from pipeline.run.plan import dry_run  # noqa: PLC0415

        print(dry_run(opts))
        return ExitCode.OK
    try:
        summary = asyncio.run(_engine_run(args, opts))
    finally:
        interrupt_on_term()  # asyncio put SIGTERM back to its default (kill) when the run ended
    if not args.quiet or summary.exit_code:
        print(summary.render(), file=sys.stderr)
    return int(summary.exit_code)


async def _engine_run(args: argparse.Namespace, opts: Any) -> Any:
    """Run the engine --engine names; the SDK, aiohttp and the sink load here."""
    from pipeline.engines import run_engine  # noqa: PLC0415

    return await run_engine(args.engine, opts, batch=batch_settings(args), actors=args.ray_actors)


def _run_procs(args: argparse.Namespace, opts: Any) -> int:
    """--procs N: the shards as child processes of this one."""
    from pipeline.run.procs import run_procs  # noqa: PLC0415 - commands load what they need

    def child_args(shard: Any, limit: int | None) -> list[str]:
        words = [*_passed_on(args), "--output", str(opts.output), "--shard", shard.label, "--quiet"]
        words += ["--rate-share", str(args.rate_share) if args.rate_share else f"1/{shard.count}"]
        return words + (["--limit", str(limit)] if limit is not None else [])

    if args.dry_run:
        from pipeline.run.plan import dry_run  # noqa: PLC0415

        print(dry_run(opts, procs=args.procs))
        return ExitCode.OK
    summary, code = run_procs(opts, args.procs, child_args)
    if summary is not None and (not args.quiet or code):
        print(summary.render(), file=sys.stderr)
    return code


# Flags the --procs parent settles itself (or gives each child its own value of).
_PARENT_ONLY = frozenset(
    {
        "procs",
        "shard",
        "skip_labeled",
        "limit",
        "mode",
        "no_progress",
        "quiet",
        "dry_run",
        "output",
        "rate_share",
        "max_cost",
    }
)


def _passed_on(args: argparse.Namespace) -> list[str]:
    """The `label` flags of this command, rebuilt from what was parsed (so abbreviations and aliases work)."""
    words = ["label"]
    for action in args.label_parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in _PARENT_ONLY or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            words.append(flag)
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words


def _resume_command(argv: Sequence[str], output: Path) -> str:
    """The user's own command, minus --skip_labeled (a resume must not start over), plus --output if it was implicit."""
    words = ["labelstream", *argv]
    kept: list[str] = []
    skip_next = False
    for i, word in enumerate(words):
        if skip_next:
            skip_next = False
            continue
        if word in {"--skip_labeled", "--skip-labeled"} and i + 1 < len(words):
            skip_next = True
            continue
        if word.startswith(("--skip_labeled=", "--skip-labeled=")):
            continue
        kept.append(word)
    if "--output" not in kept and not any(w.startswith("--output=") for w in kept):
        kept += ["--output", str(output)]
    from pipeline.sinks.storage_options import redact_argv  # noqa: PLC0415 - the hint is written to the progress file

    return shlex.join(redact_argv(kept))
