"""`labelstream` command line: parses flags and calls the library; errors are printed in one place."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

# Only the standard library and light modules at import time (no SDK, aiohttp or pyarrow): `--help` and bad
# flags stay fast, and a Ctrl-C while a command loads them ends with one line (see main).
from pipeline.config import DEFAULT_MODEL
from pipeline.errors import LabelstreamError, UsageError, redact

EXIT_BUG = 70
EXIT_INTERRUPTED = 130


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"true", "1", "yes", "y"}:
        return True
    if value in {"false", "0", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _number(
    kind: type[int] | type[float], *, above: float | None = None, at_least: float | None = None
) -> Callable[[str], Any]:
    """An argparse type for a finite number with a lower bound (`above` is exclusive, `at_least` inclusive)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"expected a number > {above:g}, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"expected a number ≥ {at_least:g}, got {text}")
        return value

    return parse


_positive_int = _number(int, at_least=1)
_count = _number(int, at_least=0)
_positive_float = _number(float, above=0)
_seconds = _number(float, at_least=0)


def _share(text: str) -> float:
    value = _number(float, at_least=0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text}")
    return float(value)


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
    pace.add_argument("--max-retries", type=_count, default=5, help="retries per row before it is dead-lettered")
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
    scope.add_argument("--relabel-changed", action="store_true", help="relabel done rows whose text has changed")
    scope.add_argument("--force", action="store_true", help="resume a sink made with another model/prompt/labels")
    scope.add_argument("--dry-run", action="store_true", help="check input, config and sink; make no API call")

    run = label.add_argument_group("checkpoints and output")
    run.add_argument("--checkpoint-every", type=_positive_int, help="rows per sink write (JSONL 1000, Parquet 5000)")
    run.add_argument("--checkpoint-seconds", type=_positive_float, help="seconds between sink writes (2 / 30)")
    run.add_argument("--grace", type=_seconds, default=10.0, help="seconds in-flight requests get after Ctrl-C")
    shown = run.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true", help="no bar: a plain log line every 10 s")
    shown.add_argument("--quiet", action="store_true", help="no progress and no notes; the summary only on failure")


def _add_simulate(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="run the OpenAI-compatible test server on 127.0.0.1")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_count, default=8787, help="0 picks a free port (see --port-file)")
    sim.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    sim.add_argument("--latency-ms", type=_seconds, default=200.0)
    sim.add_argument("--latency-jitter-ms", type=_seconds, default=0.0)
    sim.add_argument("--rpm", type=_positive_int, help="requests per minute before 429")
    sim.add_argument("--tpm", type=_positive_int, help="tokens per minute before 429")
    sim.add_argument("--error-rate", type=_share, default=0.0, help="share of requests answered 500/502/503")
    sim.add_argument("--hang-rate", type=_share, default=0.0, help="share of requests never answered")
    sim.add_argument("--malformed-rate", type=_share, default=0.0, help="share of replies that are unusable")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--window-seconds", type=_positive_float, default=60.0, help="rate window length (tests shorten it)"
    )
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


def _run_options(args: argparse.Namespace, argv: Sequence[str]) -> Any:
    """RunOptions from the `label` flags: the one place that maps flags to options."""
    from pipeline.config import load_config  # noqa: PLC0415 - commands load what they need
    from pipeline.limits import LimitSettings, RetryPolicy  # noqa: PLC0415
    from pipeline.options import RunOptions  # noqa: PLC0415

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
    if args.concurrency == "auto":
        limits = LimitSettings.automatic(rpm=args.rpm, tpm=args.tpm)
    else:
        limits = LimitSettings(concurrency=int(args.concurrency), rpm=args.rpm, tpm=args.tpm)
    input_path = Path(args.input)
    output = Path(args.output) if args.output else input_path.with_suffix(".labels.jsonl")
    return RunOptions.build(
        input_path,
        output,
        config,
        encoding=args.encoding,
        delimiter=args.delimiter,
        require_id_column=bool(args.id_column),
        checkpoint_rows=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        limits=limits,
        retry=RetryPolicy(max_attempts=args.max_retries + 1, timeout=args.timeout),
        base_url=args.base_url,
        max_rows=max_rows,
        force=args.force,
        restart=not args.skip_labeled,
        relabel_changed=args.relabel_changed,
        progress="off" if args.quiet else "log" if args.no_progress else "auto",
        grace_seconds=args.grace,
        exact_tokens=args.exact_tokens,
        command=_resume_command(argv, output),
    )


def _label(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import asyncio  # noqa: PLC0415 - commands load what they need

    opts = _run_options(args, argv)
    if args.dry_run:
        from pipeline.plan import dry_run  # noqa: PLC0415

        print(dry_run(opts))
        return 0
    from pipeline.run import run_label  # noqa: PLC0415 - the SDK, aiohttp and the sink load here

    try:
        summary = asyncio.run(run_label(opts))
    finally:
        _interrupt_on_term()  # asyncio put SIGTERM back to its default (kill) when the run ended
    if not args.quiet or summary.exit_code:
        print(summary.render(), file=sys.stderr)
    return int(summary.exit_code)


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
    from pipeline.simulator import SimulatorConfig, serve  # noqa: PLC0415 - aiohttp server only here

    try:
        config = SimulatorConfig(
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
        serve(config, host=args.host, port=args.port, port_file=args.port_file)
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    return 0


def _status(args: argparse.Namespace) -> int:
    import orjson  # noqa: PLC0415 - commands load what they need

    from pipeline.status import render_status, sink_status  # noqa: PLC0415

    report = sink_status(args.output)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_status(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export_labels  # noqa: PLC0415 - commands load what they need

    result = export_labels(args.output, args.input, args.to)
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
    return 0


def _compact(args: argparse.Namespace) -> int:
    from pipeline.sinks.compact import compact  # noqa: PLC0415 - only this command needs pyarrow here

    if args.output.suffix.lower() != ".parquet":
        raise UsageError("compact works on a Parquet sink (OUT.parquet); a JSONL sink is one file already.")
    before, after = compact(args.output, rows_per_part=args.rows_per_part)
    print(f"{args.output}: {before} parts → {after}")
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": _simulate,
    "status": _status,
    "export": _export,
    "compact": _compact,
}


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


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _interrupt_on_term() -> None:
    """SIGTERM acts like Ctrl-C until a run installs its own handlers (default: die without a word)."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `labelstream` console script; returns the exit code."""
    secret = os.environ.get("OPENAI_API_KEY")
    try:
        _interrupt_on_term()
        _limit_malloc_arenas()
        args_list = list(sys.argv[1:] if argv is None else argv)
        # The old script took its flags without a subcommand: `labelstream --input_csv x.csv` still labels.
        if args_list and args_list[0].startswith("-") and args_list[0] not in {"-h", "--help"}:
            args_list.insert(0, "label")
        args = build_parser().parse_args(args_list)
        if args.command == "label":
            return _label(args, args_list)
        return _HANDLERS[args.command](args)
    except LabelstreamError as exc:
        print(f"labelstream: error: {redact(exc.message, secret)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("labelstream: interrupted; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: show the traceback, but never the key
        text = "".join(traceback.format_exception(exc))
        print(redact(text, secret), file=sys.stderr)
        print("labelstream: this is a bug; please report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG
