"""`labelstream eval`: score a sink's labels against a gold CSV, in aligned tables, JSON, or an HTML report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.args import add_storage_option, location
from pipeline.errors import ExitCode


def register(sub: Any) -> None:
    """Add the `eval` subcommand."""
    ev = sub.add_parser("eval", help="accuracy, per-label F1, kappa and confusion of a sink against gold labels")
    ev.add_argument("output", type=location, help="the sink (OUT.jsonl or OUT.parquet)")
    ev.add_argument(
        "--gold", required=True, help="CSV, JSONL or Parquet with the sink's id column and a gold label column"
    )
    ev.add_argument("--gold-column", default="label", help="the column of gold labels (default: %(default)s)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ev.add_argument("--report", type=Path, help="also write a self-contained HTML report here")
    add_storage_option(ev)
    ev.set_defaults(handler=run)


def run(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Print the evaluation (and write the report)."""
    import orjson  # noqa: PLC0415 - commands load what they need

    from pipeline.analysis.evaluate import evaluate  # noqa: PLC0415

    result = evaluate(args.output, args.gold, args.gold_column)
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(result.render())
    if args.report is not None:
        from pipeline.analysis.report import write_report  # noqa: PLC0415

        write_report(args.report, args.output, evaluation=result)
        print(f"report: {args.report}", file=sys.stderr if args.json else sys.stdout)
    return ExitCode.OK
