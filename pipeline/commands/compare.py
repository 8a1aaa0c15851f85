"""`labelstream compare`: which model and task file are good enough for the least money, on a gold sample."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.args import concurrency, count, positive_float, positive_int, share
from pipeline.commands.signals import interrupt_on_term
from pipeline.errors import ExitCode


def register(sub: Any) -> None:
    """Add the `compare` subcommand."""
    cmp = sub.add_parser(
        "compare",
        help="label one stratified gold sample with every model × task file, then compare quality, cost and speed",
    )
    cmp.add_argument("--input", type=Path, required=True, help="gold CSV: the task's id/text columns and gold labels")
    cmp.add_argument("--gold-column", default="label", help="the column of gold labels (default: %(default)s)")
    cmp.add_argument(
        "--config", action="append", required=True, help="a task file; give it again for each prompt to compare"
    )
    cmp.add_argument("--model", action="append", help="a model; give it again for each (default: the config's)")
    cmp.add_argument("--sample", type=positive_int, default=300, help="rows in the sample (default: %(default)s)")
    cmp.add_argument("--seed", type=count, default=0, help="the sample's seed (default: %(default)s)")
    cmp.add_argument("--out", type=Path, default=Path("compare"), help="folder of the sample, sinks and report")
    cmp.add_argument(
        "--tolerance",
        type=share,
        default=0.02,
        help="pick the cheapest candidate whose macro-F1 is at most this far below the best (default: %(default)s)",
    )
    cmp.add_argument("--full-input", type=Path, help="the file the pick's printed command labels (default: --input)")
    cmp.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI)")
    cmp.add_argument(
        "--concurrency", type=concurrency, default="auto", help="per candidate: a ceiling, or auto (default)"
    )
    cmp.add_argument(
        "--rpm", type=positive_float, help="the key's requests per minute, shared by candidates of a model"
    )
    cmp.add_argument("--tpm", type=positive_float, help="the key's tokens per minute, shared the same way")
    cmp.add_argument("--max-retries", type=count, default=5, help="retries per row before it is dead-lettered")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp.add_argument("--dry-run", action="store_true", help="draw the sample and price the comparison; no API call")
    cmp.set_defaults(handler=run)


def run(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Compare the candidates (or price the comparison); 1 when a candidate failed."""
    import orjson  # noqa: PLC0415 - commands load what they need

    from pipeline.analysis.report import write_page  # noqa: PLC0415
    from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy  # noqa: PLC0415
    from pipeline.run.compare import CompareSettings, dry_run_compare, next_run, run_compare  # noqa: PLC0415

    if args.concurrency == "auto":
        limits = LimitSettings.automatic(rpm=args.rpm, tpm=args.tpm)
    else:
        limits = LimitSettings(concurrency=int(args.concurrency), rpm=args.rpm, tpm=args.tpm)
    settings = CompareSettings(
        gold=args.input,
        configs=[Path(c) for c in args.config],
        models=args.model or (),
        gold_column=args.gold_column,
        sample_size=args.sample,
        seed=args.seed,
        out=args.out,
        tolerance=args.tolerance,
        limits=limits,
        retry=RetryPolicy(max_attempts=args.max_retries + 1),
        base_url=args.base_url,
        full_input=args.full_input,
    )
    if args.dry_run:
        print(dry_run_compare(settings))
        return ExitCode.OK
    try:
        from pipeline.engines.online import OnlineEngine  # noqa: PLC0415 - commands load what they need

        comparison, errors = run_compare(settings, sys.stderr, OnlineEngine)
    finally:
        interrupt_on_term()  # asyncio put SIGTERM back to its default (kill) when the runs ended
    footer = next_run(settings, comparison)
    report = write_page(args.out / "report.html", comparison.html(footer))
    if args.json:
        body = {**comparison.as_dict(), "next": footer, "report": str(report), "errors": errors}
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(comparison.render())
        print()
        print("\n".join(footer))
        print(f"report: {report}")
    return ExitCode.DEAD_LETTERS if errors else ExitCode.OK
