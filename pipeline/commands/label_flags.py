"""The flags of `labelstream label`, one function per group of the help; `label.py` maps them to RunOptions.

Each function adds one argument group, in the order `--help` shows them. A new flag goes into the group whose
title says what it is about, and into `label._run_options` (or the engine settings) that reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.commands.args import (
    add_storage_option,
    concurrency,
    count,
    fraction,
    parse_bool,
    positive_float,
    positive_int,
    seconds,
    share,
)
from pipeline.engines.batch.settings import MAX_REQUESTS
from pipeline.task.config import DEFAULT_MODEL


def add_label_flags(label: argparse.ArgumentParser) -> None:
    """Add every flag of `label` to its parser, group by group."""
    _input_flags(label.add_argument_group("input and output"))
    _model_flags(label.add_argument_group("model and endpoint"))
    _pace_flags(label.add_argument_group("pace and retries"))
    _engine_flags(label.add_argument_group("engine and price"))
    _scope_flags(label.add_argument_group("what to label"))
    _spend_flags(label.add_argument_group("cost and confidence"))
    _scale_flags(label.add_argument_group("scaling out"))
    _saving_flags(label.add_argument_group("checkpoints and output"))


def _input_flags(io: Any) -> None:
    """Where the rows come from and where the labels go."""
    io.add_argument(
        "--input",
        "--input_csv",
        dest="input",
        required=True,
        help="CSV/TSV (also .gz/.zst), JSONL or Parquet (a file or a directory) to label; a local path or s3:// gs://",
    )
    io.add_argument(
        "--input-format", choices=("csv", "tsv", "jsonl", "parquet"), help="the input's format (default: by extension)"
    )
    io.add_argument("--output", help="OUT.jsonl or OUT.parquet (default: INPUT.labels.jsonl)")
    io.add_argument("--config", default="configs/sentiment.toml", help="task file (default: %(default)s)")
    io.add_argument("--text-column", help="override the config's text column")
    io.add_argument("--id-column", help="override the config's id column ('' = content hashes)")
    io.add_argument("--encoding", default="utf-8", help="input encoding (default: utf-8, BOM or not)")
    io.add_argument("--delimiter", help="field delimiter (default: guessed from the header)")
    add_storage_option(io)


def _model_flags(model: Any) -> None:
    """Which model answers, and at which endpoint(s)."""
    model.add_argument("--model", help=f"model name (default: the config's, else {DEFAULT_MODEL})")
    model.add_argument(
        "--base-url",
        action="append",
        help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI); give it again for each server of a "
        "fleet: requests go to the one with the fewest in flight",
    )


def _pace_flags(pace: Any) -> None:
    """How fast requests go out, and how often a row is retried."""
    pace.add_argument(
        "--concurrency",
        "--max_concurrent",
        dest="concurrency",
        type=concurrency,
        default="auto",
        help="a hard ceiling on requests in flight, or 'auto': start at 10, grow while the provider keeps up "
        "(default: %(default)s)",
    )
    pace.add_argument("--rpm", type=positive_float, help="stay under this many requests per minute")
    pace.add_argument("--tpm", type=positive_float, help="stay under this many tokens per minute")
    pace.add_argument(
        "--exact-tokens",
        action="store_true",
        help="count tokens with the model's BPE under a TPM limit (pip install labelstream[tokens]; ~140 MB)",
    )
    pace.add_argument(
        "--rate-share",
        type=fraction,
        help="this process's share of the key's limits, e.g. 1/4 (default: 1/N with --procs N, and with "
        "--shard i/N when --rpm/--tpm are given; else 1)",
    )
    pace.add_argument("--max-retries", type=count, default=5, help="retries per row before it is dead-lettered")
    pace.add_argument("--timeout", type=positive_float, help="seconds per request (default: 60; 900 with flex)")


def _engine_flags(engine: Any) -> None:
    """The --engine flag and the flags of each engine."""
    from pipeline.engines import ENGINES  # noqa: PLC0415 - the registry is light: names only

    engine.add_argument(
        "--engine",
        choices=list(ENGINES),
        default=next(iter(ENGINES)),
        help="online (default): requests as you go. batch: the OpenAI Batch API, half price, results within "
        "24 h. auto: the first --online-rows online to check the prompt, the rest as batches. ray: a Ray "
        "Data job (labelstream[ray]) on the cluster in RAY_ADDRESS or a local Ray; Parquet output",
    )
    engine.add_argument(
        "--ray-actors",
        type=positive_int,
        default=2,
        help="ray: labeling actors; --concurrency and the rate limits are shared by all (default: %(default)s)",
    )
    engine.add_argument(
        "--service-tier",
        choices=["flex"],
        help="online requests with service_tier flex: batch prices, slower replies (timeout 15 min); a 429 "
        "'resource_unavailable' is retried with backoff",
    )
    engine.add_argument(
        "--no-wait",
        action="store_true",
        help="batch/auto: return once the batches are sent; the same command later collects them",
    )
    engine.add_argument(
        "--batch-size", type=positive_int, help=f"batch/auto: requests per batch (at most and default {MAX_REQUESTS:,})"
    )
    engine.add_argument(
        "--online-rows",
        type=count,
        default=100,
        help="auto: rows labeled online first, to check the prompt and measure tokens (default: %(default)s)",
    )
    engine.add_argument("--retry-refused", action="store_true", help="batch/auto: resend requests refused as sent")
    engine.add_argument(
        "--poll-interval",
        type=positive_float,
        default=5.0,
        help="batch/auto: seconds between looks at running batches at first; grows to 60 while nothing changes",
    )


def _scope_flags(scope: Any) -> None:
    """Which rows this run labels, and what it does with a sink that holds some."""
    scope.add_argument("--limit", type=positive_int, help="label at most N rows not yet in the sink")
    scope.add_argument("--mode", choices=["test", "full"], help="test = --limit 50 (seed flag)")
    scope.add_argument(
        "--skip_labeled",
        "--skip-labeled",
        dest="skip_labeled",
        type=parse_bool,
        default=True,
        metavar="True|False",
        help="True (default): resume, skipping rows already in the sink. False: move the old sink aside, start over",
    )
    scope.add_argument("--relabel-changed", action="store_true", help="relabel done rows whose text has changed")
    scope.add_argument("--force", action="store_true", help="resume a sink made with another model/prompt/labels")
    scope.add_argument(
        "--no-dedupe",
        dest="dedupe",
        action="store_false",
        help="send every row, even rows whose text was sent before (default: one request per distinct text; "
        "the other rows get a copy marked copied_from, see docs/dedupe.md)",
    )
    scope.add_argument(
        "--dedupe",
        dest="dedupe_match",
        choices=("exact", "normalized"),
        default="exact",
        help="which texts count as the same: exact (default, byte for byte as sent) or normalized (also equal "
        "after collapsing whitespace and ignoring case)",
    )
    scope.add_argument("--dry-run", action="store_true", help="check input, config and sink; make no API call")


def _spend_flags(spend: Any) -> None:
    """What a run may cost, which prices it uses, and which labels go to review."""
    spend.add_argument(
        "--max-cost",
        type=positive_float,
        metavar="USD",
        help="refuse to start when the estimate is higher; stop (saved, resumable, exit 4) before passing it",
    )
    spend.add_argument("--prices", type=Path, help="price table (default: $LABELSTREAM_PRICES or configs/prices.toml)")
    spend.add_argument(
        "--review-below",
        type=share,
        metavar="P",
        help="write rows whose label confidence is under P to OUT.review.csv beside the sink",
    )


def _scale_flags(scale: Any) -> None:
    """Shards and shard processes."""
    scale.add_argument(
        "--shard",
        metavar="i/N|auto",
        help="label only the rows whose id hashes to shard i of N (from 0), into that shard's part of --output; "
        "auto: i from JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID",
    )
    scale.add_argument(
        "--procs", type=positive_int, help="run N shard processes on this machine, with one progress and summary"
    )


def _saving_flags(saving: Any) -> None:
    """How often the sink is written, how a stop ends, and what the terminal shows."""
    saving.add_argument(
        "--checkpoint-every",
        type=positive_int,
        help="rows per sink write (JSONL 1000, Parquet 5000, --engine ray 1000)",
    )
    saving.add_argument("--checkpoint-seconds", type=positive_float, help="seconds between sink writes (2 / 30)")
    saving.add_argument("--grace", type=seconds, default=10.0, help="seconds in-flight requests get after Ctrl-C")
    shown = saving.add_mutually_exclusive_group()
    shown.add_argument("--no-progress", action="store_true", help="no bar: a plain log line every 10 s")
    shown.add_argument("--quiet", action="store_true", help="no progress and no notes; the summary only on failure")
