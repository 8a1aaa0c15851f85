"""`labelstream status`, `export` and `compact`: reading and tidying a sink."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.args import add_storage_option, location, positive_int, share
from pipeline.errors import ExitCode, UsageError


def register(sub: Any) -> None:
    """Add the `status`, `export` and `compact` subcommands."""
    status = sub.add_parser("status", help="counts, failure rate and recent errors of a sink (all its shards)")
    status.add_argument("output", type=location)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--report", type=Path, help="write a self-contained HTML report of a finished run here")
    add_storage_option(status)
    status.set_defaults(handler=run_status)

    export = sub.add_parser("export", help="join labels back onto the input rows (CSV, JSONL or Parquet)")
    export.add_argument("output", type=location, help="the sink (OUT.jsonl or OUT.parquet)")
    export.add_argument("--input", "--input_csv", dest="input", required=True, help="the labeled input (any format)")
    export.add_argument(
        "--input-format", choices=("csv", "tsv", "jsonl", "parquet"), help="input format (default: by extension)"
    )
    export.add_argument("--to", type=Path, required=True, help="labeled.csv, .jsonl or .parquet, or tasks.json")
    export.add_argument(
        "--format",
        choices=["table", "label-studio"],
        help="table: the input with a label column (.csv/.jsonl/.parquet); label-studio: tasks with the labels as "
        "predictions scored by confidence (default: label-studio for a .json --to, else table)",
    )
    export.add_argument(
        "--below", type=share, metavar="P", help="label-studio: only rows whose confidence is under P (to review)"
    )
    add_storage_option(export)
    export.set_defaults(handler=run_export)

    compact = sub.add_parser(
        "compact", help="merge the part files of a Parquet sink (a finished sharded one: into one)"
    )
    compact.add_argument("output", type=location, help="OUT.parquet")
    compact.add_argument("--rows-per-part", type=positive_int, default=1_000_000)
    add_storage_option(compact)
    compact.set_defaults(handler=run_compact)


def run_status(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Print what a sink holds."""
    import orjson  # noqa: PLC0415 - commands load what they need

    from pipeline.analysis.status import ensure_finished, render_status, sink_status  # noqa: PLC0415

    report = sink_status(args.output)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_status(report))
    if args.report is not None:
        from pipeline.analysis.report import write_report  # noqa: PLC0415

        ensure_finished(args.output)
        write_report(args.report, args.output)
        print(f"report: {args.report}", file=sys.stderr if args.json else sys.stdout)
    return ExitCode.OK


def run_export(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Join labels back onto the input (or write Label Studio tasks)."""
    from pipeline.analysis.export import export_labels  # noqa: PLC0415 - commands load what they need

    kind = args.format or ("label-studio" if args.to.suffix.lower() == ".json" else "table")
    if kind == "label-studio" or args.below is not None:
        return _export_tasks(args, kind)
    result = export_labels(args.output, args.input, args.to, input_format=args.input_format)
    print(
        f"wrote {result.output}: {result.rows:,} rows, {result.labeled:,} labeled, "
        f"{result.unlabeled:,} without a label (left empty)"
    )
    if result.ragged:
        lines = ", ".join(map(str, result.ragged_lines))
        print(
            f"  {result.ragged:,} rows had more fields than the header (rows {lines}…); their extra fields are not "
            "in the export: quote the fields that contain the delimiter",
            file=sys.stderr,
        )
    if result.unlisted:
        print(
            f"  {result.unlisted:,} JSONL rows have keys the first line does not (lines "
            f"{', '.join(map(str, result.unlisted_lines))}…); they are not columns here: export to .jsonl to keep them",
            file=sys.stderr,
        )
    return ExitCode.OK


def _export_tasks(args: argparse.Namespace, kind: str) -> int:
    """`export --format label-studio`: tasks for review in Label Studio."""
    from pipeline.analysis.labelstudio import check_tasks_target, write_tasks  # noqa: PLC0415

    check_tasks_target(args.to, args.below, kind)
    written = write_tasks(args.output, args.input, args.to, below=args.below)
    which = f" with confidence under {args.below:g}" if args.below is not None else ""
    print(
        f"wrote {written.path}: {written.tasks:,} Label Studio tasks{which}, {written.predicted:,} with the model's "
        "label as a prediction (import them into a project set up with `labelstream label-studio-config`)"
    )
    return ExitCode.OK


def run_compact(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Merge a Parquet sink's parts."""
    from pipeline.sinks.compact import compact  # noqa: PLC0415 - only this command needs pyarrow here

    if args.output.suffix.lower() != ".parquet":
        raise UsageError(
            "compact works on a Parquet sink (OUT.parquet); a JSONL sink is one file already (and the files of a "
            "sharded one are read as one by status and export)."
        )
    before, after = compact(args.output, rows_per_part=args.rows_per_part)
    print(f"{args.output}: {before} parts → {after}")
    return ExitCode.OK
