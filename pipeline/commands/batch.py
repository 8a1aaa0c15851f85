"""`labelstream batch prepare|ingest|status|cancel`: request files for other runners, their results merged back,
and a sink's Batch API batches looked at or cancelled."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.args import add_storage_option, location, positive_int
from pipeline.engines.batch.settings import MAX_REQUESTS
from pipeline.errors import ExitCode, UsageError


def register(sub: Any) -> None:
    """Add the `batch` subcommand and its four actions."""
    batch = sub.add_parser("batch", help="Batch API batches: prepare request files, ingest results, status, cancel")
    actions = batch.add_subparsers(dest="action", required=True, metavar="ACTION")

    prepare = actions.add_parser("prepare", help="write batch request files for the rows still to label")
    _task_arguments(prepare, required=True)
    prepare.add_argument("--to", type=Path, required=True, help="folder for requests-0001.jsonl, ...")
    prepare.add_argument("--output", type=location, help="sink whose rows (and running batches) to leave out")
    prepare.add_argument(
        "--batch-size", type=positive_int, help=f"requests per file (at most and default {MAX_REQUESTS:,})"
    )
    prepare.add_argument("--limit", type=positive_int, help="write at most N rows")
    prepare.add_argument(
        "--retry-refused", action="store_true", help="write rows whose request a server refused as sent before, too"
    )
    prepare.add_argument(
        "--model-path",
        help="the weights vLLM's run_batch should load (a folder or hub name), for the command printed at the end",
    )
    add_storage_option(prepare)
    prepare.set_defaults(handler=run_prepare)

    ingest = actions.add_parser("ingest", help="merge result files from a batch runner into a sink, once per row")
    ingest.add_argument("output", type=location, help="the sink (OUT.jsonl or OUT.parquet)")
    ingest.add_argument("results", type=Path, nargs="+", help="result files (OpenAI batch output or vLLM run_batch)")
    _task_arguments(ingest, required=False)
    ingest.add_argument("--force", action="store_true", help="merge into a sink made with another model/prompt")
    add_storage_option(ingest)
    ingest.set_defaults(handler=run_ingest)

    status = actions.add_parser("status", help="a sink's batches, as recorded and as the provider sees them")
    status.add_argument("output", type=location)
    status.add_argument("--base-url", help="endpoint (default: $OPENAI_BASE_URL or OpenAI)")
    status.add_argument("--offline", action="store_true", help="show the record only; ask the provider nothing")
    status.add_argument("--json", action="store_true", help="print JSON")
    add_storage_option(status)
    status.set_defaults(handler=run_status)

    cancel = actions.add_parser("cancel", help="cancel a sink's running batches (finished results are kept)")
    cancel.add_argument("output", type=location)
    cancel.add_argument("--base-url", help="endpoint (default: $OPENAI_BASE_URL or OpenAI)")
    add_storage_option(cancel)
    cancel.set_defaults(handler=run_cancel)


def _task_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    where = "" if required else " (default: what the sink's last run used)"
    parser.add_argument("--input", "--input_csv", dest="input", type=Path, required=required, help=f"the CSV{where}")
    parser.add_argument("--config", type=Path, required=required, help=f"task file{where}")
    parser.add_argument("--model", help="model name" + (where or " (default: the task file's)"))
    parser.add_argument("--text-column", help="override the config's text column")
    parser.add_argument("--id-column", help="override the config's id column ('' = content hashes)")
    parser.add_argument("--encoding", default="utf-8", help="input encoding (default: utf-8)")
    parser.add_argument("--delimiter", help="field delimiter (default: guessed from the header)")


def _options(args: argparse.Namespace, output: Path, **extra: Any) -> Any:
    from pipeline.run.options import RunOptions  # noqa: PLC0415
    from pipeline.task.config import load_config  # noqa: PLC0415 - commands load what they need

    config = load_config(args.config).with_overrides(
        model=args.model, text_column=args.text_column, id_column=args.id_column
    )
    return RunOptions.build(
        args.input,
        output,
        config,
        encoding=args.encoding,
        delimiter=args.delimiter,
        require_id_column=bool(args.id_column),
        progress="off",
        **extra,
    )


def run_prepare(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Write request files; print what to run next."""
    from pipeline.engines.batch.offline import prepare_requests  # noqa: PLC0415
    from pipeline.engines.batch.settings import BatchSettings  # noqa: PLC0415

    if args.batch_size and args.batch_size > MAX_REQUESTS:
        raise UsageError(f"--batch-size may be at most {MAX_REQUESTS:,} (the Batch API's limit per file).")
    output = args.output or args.input.with_suffix(".labels.jsonl")
    opts = _options(args, output, max_rows=args.limit)
    settings = BatchSettings(max_requests=args.batch_size or MAX_REQUESTS, retry_refused=args.retry_refused)
    done = prepare_requests(opts, args.to, settings)
    print(
        f"wrote {done.rows:,} requests in {len(done.files)} files to {args.to}; left out {done.skipped_done:,} rows "
        f"already in {output}, {done.in_batches:,} in its running batches, {done.repeats:,} repeated ids and "
        f"{done.problems:,} unusable rows"
    )
    if done.refused_before:
        print(
            f"also left out {done.refused_before:,} rows whose very request a server refused before (see the dead "
            f"letters of {output}): it would fail the same way. Shorten their text (max_chars in the task file), "
            "use a model with a longer context, or fix what the message names, and they are written again; after "
            "changing the server instead (vLLM: a larger --max-model-len), add --retry-refused."
        )
    if done.files:
        ingest = " ".join(
            [
                shlex.join(["labelstream", "batch", "ingest", str(output)]),
                f"{shlex.quote(str(args.to))}/results-*.jsonl",  # the shell expands the glob
                shlex.join(["--input", str(args.input), "--config", str(args.config), "--model", opts.model]),
            ]
        )
        print(f"{_run_batch_lines(done.files, opts.model, args.model_path)}\nthen merge the results:\n  {ingest}")
    return ExitCode.OK


# What `run_batch` loads when no --model-path is given: the user puts the model's folder there.
_MODEL_PLACEHOLDER = "/path/to/model"


def _run_batch_lines(files: Sequence[Any], model: str, model_path: str | None) -> str:
    """How to run the request files with vLLM's run_batch: `--model` is what it loads (a path or hub name),
    `--served-model-name` the name the requests ask for; given only the alias, vLLM tries to download it."""
    options = shlex.join(["--model", model_path or _MODEL_PLACEHOLDER, "--served-model-name", model])
    run = "python -m vllm.entrypoints.openai.run_batch"
    where = (
        ""
        if model_path
        else f" (put the model's folder or hub name, as given to `vllm serve`, for {_MODEL_PLACEHOLDER})"
    )
    if len(files) == 1:
        first = files[0].path
        results = first.with_name(first.name.replace("requests-", "results-", 1))
        return (
            f"run it with vLLM{where}:\n  {run} -i {shlex.quote(str(first))} -o {shlex.quote(str(results))} {options}"
        )
    folder = shlex.quote(str(files[0].path.parent))
    # POSIX sh: requests-0001.jsonl → results-0001.jsonl beside it.
    target = '"${f%requests-*}results-${f##*requests-}"'
    loop = f'for f in {folder}/requests-*.jsonl; do {run} -i "$f" -o {target} {options}; done'
    return f"run each file with vLLM{where}:\n  {loop}"


def run_ingest(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Merge result files into a sink."""
    import asyncio  # noqa: PLC0415

    from pipeline.engines.batch.offline import ingest_results  # noqa: PLC0415

    _defaults_from_sink(args)
    opts = _options(args, args.output, force=args.force)
    done = asyncio.run(ingest_results(opts, list(args.results)))
    print(
        f"{args.output}: {done.labeled:,} rows labeled, {done.failed:,} failed (dead-lettered), {done.skipped:,} "
        f"already in the sink (skipped), {done.unknown:,} results for ids not in {args.input}, "
        f"{done.unreadable:,} unreadable lines, {done.repeated:,} repeated results"
    )
    if done.failures:
        from pipeline.api.errors import REFUSED_ADVICE  # noqa: PLC0415

        kinds = ", ".join(f"{kind} ×{n}" for kind, n in sorted(done.failures.items(), key=lambda kv: -kv[1]))
        print(f"  failures: {kinds}; details in {done.dead_letters}", file=sys.stderr)
        for kind in sorted(set(done.failures) & set(REFUSED_ADVICE)):
            print(
                f"  {kind}: {REFUSED_ADVICE[kind]}. Sent again unchanged, it fails the same way, so `batch prepare` "
                "leaves these rows out until their request changes (or, after changing the server, --retry-refused).",
                file=sys.stderr,
            )
    if done.logprobs_unread:
        print(
            f"  {done.logprobs_unread:,} rows have no confidence although their replies carried logprobs: the tokens "
            "do not spell the reply text",
            file=sys.stderr,
        )
    return done.exit_code


def _defaults_from_sink(args: argparse.Namespace) -> None:
    """Fill --input, --config and --model from the sink's manifest when they were not given."""
    from pipeline.sinks import open_meta  # noqa: PLC0415

    manifest = open_meta(args.output).read_manifest() if args.input is None or args.config is None else None
    recorded = manifest.input if manifest is not None else {}
    if args.input is None:
        where = recorded.get("file", {}).get("path") if isinstance(recorded.get("file"), dict) else None
        args.input = Path(where) if where else None
    if args.config is None and recorded.get("config"):
        args.config = Path(recorded["config"])
    if args.model is None and manifest is not None and manifest.model:
        args.model = manifest.model
    if args.input is None or args.config is None:
        raise UsageError(
            f"{args.output} does not say which input and task file made it; pass --input IN.csv and --config "
            "TASK.toml (the ones given to `batch prepare`)."
        )


def _api(base_url: str | None) -> Any:
    from pipeline.engines.batch.api import BatchApi  # noqa: PLC0415
    from pipeline.run.options import resolve_credentials  # noqa: PLC0415

    try:
        key, url = resolve_credentials(None, base_url)
    except UsageError as exc:
        raise UsageError(
            f"{exc.message} (`batch status --offline` shows what the sink recorded without a key)"
        ) from None
    return BatchApi(api_key=key, base_url=url)


def run_status(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Show a sink's batches."""
    import asyncio  # noqa: PLC0415

    import orjson  # noqa: PLC0415

    from pipeline.engines.batch.manage import batch_status, render_batch_status  # noqa: PLC0415

    async def look() -> dict[str, Any]:
        if args.offline:
            return await batch_status(args.output, None)
        api = _api(args.base_url)
        try:
            return await batch_status(args.output, api)
        finally:
            await api.aclose()

    report = asyncio.run(look())
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_batch_status(report))
    return ExitCode.OK


def run_cancel(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Cancel a sink's running batches."""
    import asyncio  # noqa: PLC0415

    from pipeline.engines.batch.manage import cancel_batches  # noqa: PLC0415

    async def cancel() -> list[tuple[str, str]]:
        api = _api(args.base_url)
        try:
            return await cancel_batches(args.output, api)
        finally:
            await api.aclose()

    cancelled = asyncio.run(cancel())
    if not cancelled:
        print(f"{args.output}: no running batches")
    for batch_id, status in cancelled:
        print(f"{batch_id}: {status}")
    if cancelled:
        print("what they finished is kept: the next `labelstream label` run collects it (and sends the rest again)")
    return ExitCode.OK
