"""`labelstream compare`, the labeling half: every candidate labels the same gold sample into a sink of its own.

Each candidate is an ordinary resumable run (a `Run` of the engine the command hands over, the online one),
so a re-run finishes what is missing and asks
nothing for a finished sink. The runs go as concurrent tasks of one event loop. A rate limit belongs to a key
and model at one endpoint, so candidates that share an endpoint and a model each take an equal share of
`--rpm`/`--tpm` and of any limit learned from the provider's headers (the `share` a `--procs` child takes);
candidates of different models keep their own, as providers count them per model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.analysis.compare import Candidate, Comparison, candidates, compare_sinks
from pipeline.analysis.sample import Sample, draw_sample
from pipeline.errors import ConfigError, Interrupted, LabelstreamError, UsageError
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.run.estimate import estimate_run
from pipeline.run.lifecycle import Engine, Run
from pipeline.run.options import RunOptions, resolve_endpoints
from pipeline.run.prepare import prepare_run
from pipeline.task.config import TaskConfig, load_config


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """What to compare and how: gold file, task files × models, the sample, where the sinks go, the limits."""

    gold: Path
    configs: Sequence[Path]
    models: Sequence[str] = ()
    gold_column: str = "label"
    sample_size: int = 300
    seed: int = 0
    out: Path = Path("compare")
    tolerance: float = 0.02
    limits: LimitSettings = field(default_factory=LimitSettings.automatic)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    base_url: str | None = None
    api_key: str | None = None
    full_input: Path | None = None  # what the pick's command labels (default: the gold file)


def prepare_compare(settings: CompareSettings) -> tuple[Sample, list[Candidate]]:
    """Load the task files, check the candidates, and draw (or reuse) the sample."""
    configs = [load_config(path) for path in settings.configs]
    chosen = candidates(configs, settings.models, settings.out)
    if len(chosen) < 2:
        raise UsageError(
            "compare needs at least two candidates to compare: give --model twice (e.g. --model gpt-4o-mini "
            "--model gpt-4.1-mini) or --config twice. For one candidate, `labelstream eval` scores it."
        )
    if len({c.sink for c in chosen}) < len(chosen):
        raise UsageError("the same task file and model are given twice; give each candidate once.")
    first = configs[0]
    for other in configs[1:]:
        if set(other.labels) != set(first.labels) or other.multi_label != first.multi_label:
            raise ConfigError(
                f"{other.source} labels {list(other.labels)}, {first.source} labels {list(first.labels)}: "
                "candidates are scored against one gold column, so their task files need the same label set."
            )
    sample = draw_sample(
        settings.gold,
        settings.gold_column,
        first.labels,
        multi_label=first.multi_label,
        size=settings.sample_size,
        seed=settings.seed,
        folder=settings.out,
    )
    return sample, chosen


def candidate_options(settings: CompareSettings, sample: Sample, chosen: Sequence[Candidate]) -> list[RunOptions]:
    """The run of each candidate, with its share of the limits of the (endpoint, model) it shares with others."""
    counts: dict[str, int] = {}
    for candidate in chosen:
        counts[candidate.model] = counts.get(candidate.model, 0) + 1
    out = []
    for candidate in chosen:
        limits = dataclasses.replace(settings.limits, share=settings.limits.share / counts[candidate.model])
        out.append(
            RunOptions.build(
                sample.path,
                candidate.sink,
                candidate.config,
                limits=limits,
                retry=settings.retry,
                base_url=settings.base_url,
                api_key=settings.api_key,
                progress="off",
                command=label_command(sample.path, candidate.sink, candidate.config, settings.base_url),
            )
        )
    return out


def label_command(input: Path, output: Path, config: TaskConfig, base_url: str | None, *extra: str) -> str:
    """The `labelstream label` command of one candidate (how to resume or repeat it by hand)."""
    words = ["labelstream", "label", "--input", str(input), "--output", str(output), "--config", config.source]
    words += ["--model", config.model, *(["--base-url", base_url] if base_url else []), *extra]
    return shlex.join(words)


async def label_candidates(
    options: Sequence[RunOptions], notice: IO[str], engine: Callable[[], Engine]
) -> dict[str, str]:
    """Label every candidate's sample concurrently, each run with a new `engine()`; returns the error of each
    candidate that failed (by sink)."""
    errors: dict[str, str] = {}

    async def one(opts: RunOptions) -> None:
        try:
            # Progress is off: a run speaks only when it fails or is stopped (Ctrl-C), and then to the user.
            summary = await Run(opts, engine(), notice=notice).execute()
        except Interrupted:
            raise
        except LabelstreamError as exc:
            errors[str(opts.output)] = exc.message
            print(f"compare: {opts.output.name}: failed: {exc.message}", file=notice)
            return
        print(
            f"compare: {opts.output.name}: {summary.labeled:,} labeled now, {summary.skipped_done:,} already done, "
            f"{summary.failed:,} failed",
            file=notice,
        )

    try:
        async with asyncio.TaskGroup() as group:
            for opts in options:
                group.create_task(one(opts))
    except* Interrupted as stopped:
        # The run that took the signal stopped; the group cancelled the others, whose writers saved what was done.
        raise Interrupted("interrupted; re-run the same compare to resume every candidate's sink.") from stopped
    return errors


def run_compare(
    settings: CompareSettings, notice: IO[str], engine: Callable[[], Engine]
) -> tuple[Comparison, dict[str, str]]:
    """Label what is missing (with `engine()`, pipeline.run importing no engine), then score every candidate
    that has labels; also returns failed candidates."""
    resolve_endpoints(settings.api_key, (settings.base_url,) if settings.base_url else ())  # no key: one error, now
    sample, chosen = prepare_compare(settings)
    print(
        f"compare: {sample.rows:,} of {sample.gold_rows:,} gold rows sampled ({_per_label(sample)}) → {sample.path}; "
        f"{len(chosen)} candidates",
        file=notice,
    )
    errors = asyncio.run(label_candidates(candidate_options(settings, sample, chosen), notice, engine))
    scored = [c for c in chosen if str(c.sink) not in errors or c.sink.exists()]
    if not scored:
        raise UsageError("no candidate labeled anything; see the errors above.")
    return compare_sinks(scored, sample.path, settings.gold_column, tolerance=settings.tolerance), errors


def next_run(settings: CompareSettings, comparison: Comparison) -> list[str]:
    """The command that labels the full input with the pick, and what that would cost at batch prices."""
    pick = comparison.pick
    if pick is None:
        return []
    full = settings.full_input or settings.gold
    output = full.with_suffix(".labels.jsonl")
    config = pick.candidate.config
    opts = RunOptions.build(full, output, config, limits=settings.limits, base_url=settings.base_url, progress="off")
    prepared = prepare_run(opts, dry_run=True)
    try:
        plan = estimate_run(opts, prepared, exact=False, reuse_source=True)
    finally:
        prepared.close()
    batch, standard = plan.costs.get("batch"), plan.costs.get("standard")
    price = "no price for this model" if batch is None else f"~${batch:.2f} at batch prices (--engine batch)"
    online = "" if standard is None else f", ~${standard:.2f} online"
    return [
        f"pick: {pick.candidate.name} (macro-F1 {pick.macro_f1:.3f}; the best is "
        f"{comparison.best.macro_f1 if comparison.best else 0:.3f}, tolerance {settings.tolerance:g})",
        f"label {full} with it ({plan.rows:,} rows to label: {price}{online}):",
        "  " + label_command(full, output, config, settings.base_url, "--engine", "batch"),
    ]


def dry_run_compare(settings: CompareSettings) -> str:
    """What the comparison itself would cost: each candidate's rows still to label, and their price."""
    sample, chosen = prepare_compare(settings)
    lines = [f"dry run: compare {len(chosen)} candidates on {sample.rows:,} sampled rows ({_per_label(sample)})"]
    total: dict[str, float | None] = {"standard": 0.0, "batch": 0.0}
    for opts, candidate in zip(candidate_options(settings, sample, chosen), chosen, strict=True):
        prepared = prepare_run(opts, dry_run=True)
        try:
            plan = estimate_run(opts, prepared, exact=False, reuse_source=True)
        finally:
            prepared.close()
        shown = []
        for tier, sum_so_far in list(total.items()):
            cost = plan.costs.get(tier)
            total[tier] = None if cost is None or sum_so_far is None else sum_so_far + cost
            shown.append(f"{tier} " + ("no price" if cost is None else f"${cost:.4f}"))
        lines.append(
            f"  {candidate.name}: {plan.rows + plan.copies:,} rows to label"
            + (f" ({plan.copies:,} copies of a repeated text, no request)" if plan.copies else "")
            + f", {len(prepared.done):,} already in {candidate.sink}; "
            + ", ".join(shown)
        )
    costs = ", ".join(f"{tier} " + ("–" if v is None else f"${v:.4f}") for tier, v in total.items())
    lines.append(f"  total: {costs} (online runs at standard prices; no API call made)")
    return "\n".join(lines)


def _per_label(sample: Sample) -> str:
    return ", ".join(f"{label} {n}" for label, n in sorted(sample.per_label.items()))
