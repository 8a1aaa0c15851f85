"""`labelstream` command line: parses flags and calls the library; errors are printed in one place."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.client import RetryPolicy
from pipeline.config import DEFAULT_MODEL, load_config
from pipeline.errors import LabelstreamError, UsageError, redact
from pipeline.limits import LimitSettings

EXIT_BUG = 70
_COMMANDS = {"label", "simulate", "status", "export", "compact"}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"true", "1", "yes", "y"}:
        return True
    if value in {"false", "0", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _concurrency(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="labelstream",
        description="Label large CSV files with an OpenAI-compatible chat model: streaming, resumable.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_label(sub)
    _add_simulate(sub)
    _add_maintenance(sub)
    return parser


def _add_label(sub: Any) -> None:
    label = sub.add_parser("label", help="label a CSV into a JSONL or Parquet sink (resumes what it holds)")
    io = label.add_argument_group("input and output")
    io.add_argument("--input", "--input_csv", dest="input", required=True, help="CSV file to label")
    io.add_argument("--output", help="OUT.jsonl or OUT.parquet (default: INPUT.labels.jsonl)")
    io.add_argument("--config", default="configs/sentiment.toml", help="task file (default: %(default)s)")
    io.add_argument("--text-column", help="override the config's text column")
    io.add_argument("--id-column", help="override the config's id column ('' = content hashes)")
    io.add_argument("--encoding", default="utf-8", help="input encoding (default: utf-8, BOM or not)")
    io.add_argument("--delimiter", help="field delimiter (default: guessed from the header)")

    model = label.add_argument_group("model and endpoint")
    model.add_argument("--model", help=f"model name (default: the config's, else {DEFAULT_MODEL})")
    model.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI)")

    pace = label.add_argument_group("pace and retries")
    pace.add_argument(
        "--concurrency",
        "--max_concurrent",
        dest="concurrency",
        type=_concurrency,
        default="auto",
        help="a hard ceiling on requests in flight, or 'auto': start at 10, grow while the provider keeps up "
        "(default: %(default)s)",
    )
    pace.add_argument("--rpm", type=_positive_float, help="stay under this many requests per minute")
    pace.add_argument("--tpm", type=_positive_float, help="stay under this many tokens per minute")
    pace.add_argument(
        "--exact-tokens",
        action="store_true",
        help="count tokens with the model's BPE under a TPM limit (pip install labelstream[tokens]; ~140 MB)",
    )
    pace.add_argument("--max-retries", type=int, default=5, help="retries per row before it is dead-lettered")
    pace.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per request (default: 60)")

    scope = label.add_argument_group("what to label")
    scope.add_argument("--limit", type=_positive_int, help="label at most N rows not yet in the sink")
    scope.add_argument("--mode", choices=["test", "full"], help="test = --limit 50 (seed flag)")
    scope.add_argument(
        "--skip_labeled",
        "--skip-labeled",
        dest="skip_labeled",
        type=_bool,
        default=True,
        metavar="True|False",
        help="True (default): resume, skipping rows already in the sink. False: move the old sink aside, start over",
    )
    scope.add_argument("--force", action="store_true", help="resume a sink made with another model/prompt/labels")
    scope.add_argument("--dry-run", action="store_true", help="check input, config and sink; make no API call")

    run = label.add_argument_group("checkpoints and output")
    run.add_argument("--checkpoint-every", type=_positive_int, help="rows per sink write (JSONL 1000, Parquet 5000)")
    run.add_argument("--checkpoint-seconds", type=_positive_float, help="seconds between sink writes (2 / 30)")
    run.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get after Ctrl-C")
    run.add_argument("--no-progress", action="store_true", help="no bar: plain log lines every 10 s")


def _add_simulate(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="run the OpenAI-compatible test server on 127.0.0.1")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787, help="0 picks a free port (see --port-file)")
    sim.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    sim.add_argument("--latency-ms", type=float, default=200.0)
    sim.add_argument("--latency-jitter-ms", type=float, default=0.0)
    sim.add_argument("--rpm", type=int, help="requests per minute before 429")
    sim.add_argument("--tpm", type=int, help="tokens per minute before 429")
    sim.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500/502/503")
    sim.add_argument("--hang-rate", type=float, default=0.0, help="share of requests never answered")
    sim.add_argument("--malformed-rate", type=float, default=0.0, help="share of replies that are unusable")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--window-seconds", type=float, default=60.0, help="rate window length (tests shorten it)")
    sim.add_argument("--api-key", help="require this bearer key (default: accept any)")
    sim.add_argument("--models", help="comma-separated models to serve (default: any)")


def _add_maintenance(sub: Any) -> None:
    status = sub.add_parser("status", help="counts, failure rate and recent errors of a sink")
    status.add_argument("output", type=Path)
    status.add_argument("--json", action="store_true", help="print JSON")

    export = sub.add_parser("export", help="join labels back onto the input rows (CSV or Parquet)")
    export.add_argument("output", type=Path, help="the sink (OUT.jsonl or OUT.parquet)")
    export.add_argument("--input", "--input_csv", dest="input", type=Path, required=True, help="the labeled CSV")
    export.add_argument("--to", type=Path, required=True, help="labeled.csv or labeled.parquet")

    compact = sub.add_parser("compact", help="merge the part files of a Parquet sink")
    compact.add_argument("output", type=Path, help="OUT.parquet")
    compact.add_argument("--rows-per-part", type=_positive_int, default=1_000_000)


def _label(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pipeline.options import RunOptions  # noqa: PLC0415 - keep `--help` fast
    from pipeline.plan import dry_run  # noqa: PLC0415
    from pipeline.run import run_label  # noqa: PLC0415

    config = load_config(args.config)
    # with_overrides skips None; --id-column '' switches to content-hash ids.
    config = config.with_overrides(model=args.model, text_column=args.text_column, id_column=args.id_column)
    limit = args.limit
    if args.mode == "test":
        if limit is not None and limit != 50:
            raise UsageError("--mode test means --limit 50; pass one of them.")
        limit = 50
    if args.max_retries < 0:
        raise UsageError("--max-retries must be 0 or more.")
    if args.concurrency == "auto":
        limits = LimitSettings.automatic(rpm=args.rpm, tpm=args.tpm)
    else:
        limits = LimitSettings(concurrency=int(args.concurrency), rpm=args.rpm, tpm=args.tpm)
    input_path = Path(args.input)
    output = Path(args.output) if args.output else input_path.with_suffix(".labels.jsonl")
    opts = RunOptions(
        input=input_path,
        output=output,
        config=config,
        limits=limits,
        retry=RetryPolicy(max_attempts=args.max_retries + 1, timeout=args.timeout),
        base_url=args.base_url,
        limit=limit,
        force=args.force,
        restart=not args.skip_labeled,
        progress=not args.no_progress,
        checkpoint_rows=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        grace_seconds=args.grace,
        exact_tokens=args.exact_tokens,
        encoding=args.encoding,
        delimiter=args.delimiter,
        require_id_column=bool(args.id_column),
        command=_resume_command(argv, output),
    )
    if args.dry_run:
        print(dry_run(opts))
        return 0
    summary = asyncio.run(run_label(opts))
    print(summary.render(), file=sys.stderr)
    return summary.exit_code


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
    return shlex.join(kept)


def _simulate(args: argparse.Namespace) -> int:
    from pipeline.simulator import serve  # noqa: PLC0415 - aiohttp server only here

    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        raise UsageError("the simulator only listens on loopback (127.0.0.1).")
    try:
        config = _simulator_config(args)
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    serve(config, host=args.host, port=args.port, port_file=args.port_file)
    return 0


def _simulator_config(args: argparse.Namespace) -> Any:
    from pipeline.simulator import SimulatorConfig  # noqa: PLC0415 - aiohttp server only here

    return SimulatorConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        rpm=args.rpm,
        tpm=args.tpm,
        error_rate=args.error_rate,
        hang_rate=args.hang_rate,
        malformed_rate=args.malformed_rate,
        seed=args.seed,
        window_seconds=args.window_seconds,
        api_key=args.api_key,
        models=frozenset(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None,
    )


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import render_status, sink_status  # noqa: PLC0415 - only this command needs it

    report = sink_status(args.output)
    if args.json:
        import orjson  # noqa: PLC0415

        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_status(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export_labels  # noqa: PLC0415 - only this command needs it

    result = export_labels(args.output, args.input, args.to)
    print(
        f"wrote {result.output}: {result.rows:,} rows, {result.labeled:,} labeled, "
        f"{result.unlabeled:,} without a label (left empty)"
    )
    return 0


def _compact(args: argparse.Namespace) -> int:
    from pipeline.parquet_sink import compact  # noqa: PLC0415 - only this command needs pyarrow here

    if args.output.suffix.lower() != ".parquet":
        raise UsageError("compact works on a Parquet sink (OUT.parquet); a JSONL sink is one file already.")
    before, after = compact(args.output, rows_per_part=args.rows_per_part)
    print(f"{args.output}: {before} parts → {after}")
    return 0


def _limit_malloc_arenas() -> None:
    """Cap glibc at two malloc arenas before any thread starts.

    Each thread that allocates under contention gets an arena of its own, and freed memory stays in it: over
    300k rows the default left RSS 7.0 MB above a 10k-row run, two arenas 5.1 MB (measured). Same as
    MALLOC_ARENA_MAX=2; a no-op where the C library has no mallopt.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes  # noqa: PLC0415 - only the CLI process tunes its allocator

        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `labelstream` console script; returns the exit code."""
    _limit_malloc_arenas()
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The old script took its flags without a subcommand: `labelstream --input_csv x.csv` still labels.
    if args_list and args_list[0].startswith("-") and args_list[0] not in {"-h", "--help"}:
        args_list.insert(0, "label")
    parser = build_parser()
    args = parser.parse_args(args_list)
    secret = os.environ.get("OPENAI_API_KEY")
    try:
        if args.command == "label":
            return _label(args, args_list)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "status":
            return _status(args)
        if args.command == "export":
            return _export(args)
        if args.command == "compact":
            return _compact(args)
        parser.error(f"unknown command {args.command!r}")
    except LabelstreamError as exc:
        print(f"labelstream: error: {redact(exc.message, secret)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("labelstream: interrupted before the run started; nothing was labeled.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: show the traceback, but never the key
        text = "".join(traceback.format_exception(exc))
        print(redact(text, secret), file=sys.stderr)
        print("labelstream: this is a bug; please report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG
    return 0
