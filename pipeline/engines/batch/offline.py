"""`labelstream batch prepare` and `batch ingest`: batches run somewhere else (vLLM's `run_batch`, or any
runner that reads OpenAI batch request files), and their results merged back with the same guarantees.

`prepare` writes the request files the batch engine would upload (rows already in the sink, in one of its
running batches, or whose unchanged request a server refused as sent, are left out). `ingest` reads result files
(lines in any order, joined by `custom_id`), validates every reply like the online path, and appends each row at
most once: a result whose row is already in the sink is skipped and counted, so ingesting the same file twice
changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pipeline.engines.batch.files import RequestFiles, Written
from pipeline.engines.batch.ingest import Merger, Outcome, read_result, refused_requests
from pipeline.engines.batch.ledger import Ledger
from pipeline.engines.batch.settings import BatchSettings
from pipeline.engines.batch.submit import Planner
from pipeline.errors import ExitCode, UsageError
from pipeline.results import Row, new_run_id
from pipeline.run.options import RunOptions
from pipeline.run.prepare import RowGate, prepare_run
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import Prompt

# Results held in memory at once; a bigger set is merged in several passes over the input.
RESULTS_PER_PASS: Final = 100_000


@dataclass(slots=True)
class Prepared:
    """What `prepare_requests` wrote."""

    files: list[Written] = field(default_factory=list)
    skipped_done: int = 0
    in_batches: int = 0
    problems: int = 0
    repeats: int = 0
    refused_before: int = 0  # left out: their unchanged request was refused as sent before

    @property
    def rows(self) -> int:
        """Requests written."""
        return sum(f.requests for f in self.files)


def prepare_requests(opts: RunOptions, to: Path, settings: BatchSettings) -> Prepared:
    """Write request files for the rows `opts.output` still lacks into the folder `to`; upload nothing."""
    if to.exists() and any(to.glob("requests-*.jsonl")):
        raise UsageError(f"{to} already holds request files; give --to an empty (or new) folder.")
    to.mkdir(parents=True, exist_ok=True)
    run = prepare_run(opts, dry_run=True)  # the resume guard and the done ids; no lock, nothing written
    try:
        stats = RunStats(calls=CallStats(), model=opts.model)
        files = RequestFiles(
            Prompt(opts.config),
            opts.model,
            name=lambda n: to / f"requests-{n:04d}.jsonl",
            max_requests=settings.max_requests,
            max_bytes=settings.max_bytes,
        )
        live = Ledger(run.sink.meta).live_ids()
        refused = {} if settings.retry_refused else refused_requests(run.sink.meta)
        gate = RowGate(run.done, stats, opts.max_rows, shard=opts.shard)
        planner = Planner.over(run.source.batches(), gate, live, stats, files, refused=refused)
        out = Prepared()
        never = threading.Event()
        try:
            while (written := planner.next_file(never)) is not None:
                out.files.append(written)
        finally:
            files.discard()
    finally:
        run.close()
    out.skipped_done, out.in_batches = stats.skipped_done, stats.in_batches
    out.problems, out.repeats = len(planner.problems), stats.duplicates + stats.conflicts
    out.refused_before = stats.refused_before
    return out


@dataclass(slots=True)
class Ingested:
    """What `ingest_results` did."""

    labeled: int = 0
    failed: int = 0
    skipped: int = 0  # already in the sink
    unknown: int = 0  # results whose custom_id is no row of the input
    unreadable: int = 0  # lines that are no result (no custom_id, not JSON)
    repeated: int = 0  # a second result for the same custom_id (the first one counts)
    unfinished: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    dead_letters: str = ""
    logprobs_unread: int = 0  # labeled without confidence though the reply carried logprobs

    @property
    def exit_code(self) -> ExitCode:
        """OK when every result labeled its row (or was already in the sink); DEAD_LETTERS when some were not."""
        return ExitCode.DEAD_LETTERS if self.failed else ExitCode.OK


async def ingest_results(opts: RunOptions, results: list[Path]) -> Ingested:
    """Merge result files made elsewhere into the sink `opts.output`, each row at most once."""
    for path in results:
        if not path.is_file():
            raise UsageError(f"{path} is not a file; pass the result files your batch runner wrote.")
    prepared = prepare_run(opts)
    try:
        prompt = Prompt(opts.config)
        stats = RunStats(calls=CallStats(), model=opts.model)
        merger = Merger(prepared.sink, prepared.done, stats, new_run_id(), opts.model, prompt=prompt)
        out = Ingested(dead_letters=str(prepared.sink.meta.dead_letters_path))
        lines = _lines(results)
        for n in itertools.count():
            outcomes = await asyncio.to_thread(_read_pass, prompt, lines, out)
            if not outcomes:
                break
            if n:
                prepared.source.close()  # another pass over the input for the next share of results
                prepared.source.open()
            tally = await merger.merge(_rows(prepared.source.batches()), outcomes, only_answered=True)
            out.labeled += tally.labeled
            out.failed += tally.failed
            out.skipped += tally.skipped
            out.unfinished += tally.unfinished
            out.unknown += len(outcomes)  # what no input row took
        out.failures = dict(stats.failure_counts)
        out.logprobs_unread = stats.calls.logprobs_unread
        return out
    finally:
        await prepared.finish()


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            yield from handle


def _read_pass(prompt: Prompt, lines: Iterator[bytes], out: Ingested) -> dict[str, Outcome]:
    """The outcomes of up to RESULTS_PER_PASS result lines (the first result for an id wins)."""
    outcomes: dict[str, Outcome] = {}
    for line in itertools.islice((line for line in lines if line.strip()), RESULTS_PER_PASS):
        found = read_result(prompt, line)
        if found is None:
            out.unreadable += 1
        elif found[0] in outcomes:
            out.repeated += 1
        else:
            outcomes[found[0]] = found[1]
    return outcomes


def _rows(batches: Iterator[list[Row]]) -> Iterator[Row]:
    for batch in batches:
        yield from (row for row in batch if row.problem is None)
