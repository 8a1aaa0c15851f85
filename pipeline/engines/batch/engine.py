"""`labelstream label --engine batch`: the rows a sink lacks, labeled through the OpenAI Batch API.

    finish half-done submissions ─▶ collect ended batches ─▶ plan + submit the rest ─▶ wait, collect

Every run first brings the ledger up to date (submissions a crash left half-way are completed, batches that
ended are collected), then sends the rows no one has done or holds, then (unless --no-wait) polls until its
batches end. So re-running the same command after a crash, or after --no-wait, always carries on. The run
around it (the sink's preparation, signals, --max-cost, the summary) is `pipeline.run.lifecycle.Run`'s.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import IO, Any

from openai.types import Batch

from pipeline.engines.batch.api import BatchApi
from pipeline.engines.batch.files import RequestFiles, read_rows
from pipeline.engines.batch.ingest import Merger, Outcome, Tally, read_results, refused_requests
from pipeline.engines.batch.ledger import COLLECTED, PREPARED, SUBMITTED, Ledger, Submission, new_submission_id
from pipeline.engines.batch.poll import BatchProgress, refresh, wait_for_batches
from pipeline.engines.batch.settings import BatchSettings
from pipeline.engines.batch.submit import SETTLE_SECONDS, Planner, counts_of, submit
from pipeline.errors import BatchError, LabelstreamError, UsageError
from pipeline.results import Failed, Labeled
from pipeline.run.copies import copy_from_sink, save_copies
from pipeline.run.dedupe import Dedupe
from pipeline.run.lifecycle import Run
from pipeline.run.options import RunOptions, resolve_credentials
from pipeline.run.summary import Summary
from pipeline.sinks.progress_file import RunState
from pipeline.stats import RunStats

_ROWS_AT_ONCE = 5000  # rows of a batch read and settled at a time


class BatchEngine:
    """Requests as Batch API batches: plan request files, upload, create, poll, collect (module docstring)."""

    name = "batch"
    tier = "batch"
    after_stop = "batches already sent keep running. "

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self.settle = SETTLE_SECONDS
        self.stop_planning = threading.Event()
        self.api_key = ""
        self.base_url: str | None = None
        self.ledger: Ledger | None = None
        self.stats: RunStats | None = None
        self.progress_bar: BatchProgress | None = None

    def check(self, opts: RunOptions) -> None:
        """One endpoint, and a key for it, before the sink is touched."""
        if len(opts.base_urls) > 1:
            raise UsageError("--engine batch sends to one endpoint; pass --base-url once.")
        self.api_key, self.base_url = resolve_credentials(opts.api_key, opts.base_urls[0] if opts.base_urls else None)

    async def execute(self, run: Run) -> None:
        """Bring the ledger up to date, send what is left, and wait unless told not to."""
        api = BatchApi(api_key=self.api_key, base_url=self.base_url)
        self.ledger, self.stats = Ledger(run.sink.meta), run.stats
        self.progress_bar = BatchProgress(mode=run.opts.progress, stream=run.notice)
        try:
            await _Batches(run, self, api, self.ledger, self.progress_bar).steps()
        finally:
            self.progress_bar.close()
            await api.aclose()

    def stop(self, run: Run, signals: int) -> bool:
        """First Ctrl-C: finish the step under way (an upload, a create, a collection), then stop; batches keep
        running at the provider. Second: stop at once (the ledger is consistent after any step)."""
        if signals > 1:
            return False
        self.stop_planning.set()
        print(
            "\nlabelstream: stopping after the step under way; batches already sent keep running at the provider. "
            "Press Ctrl-C again to stop at once.",
            file=run.notice,
            flush=True,
        )
        return True

    def progress(self) -> dict[str, Any]:
        """The batches' states (the rows in batches not yet collected go in the run's stats)."""
        self._count_pending()
        return {"batches": self.progress_bar.as_dict() if self.progress_bar else {}}

    def summary(self) -> dict[str, Any]:
        """Nothing of its own: the batch counts are in the run's stats."""
        self._count_pending()
        return {}

    def _count_pending(self) -> None:
        if self.ledger is not None and self.stats is not None:
            self.stats.pending = sum(s.requests for s in self.ledger.held)


class _Batches:
    """One batch-engine run's steps: the run, its ledger, the Batch API."""

    def __init__(self, run: Run, engine: BatchEngine, api: BatchApi, ledger: Ledger, progress: BatchProgress) -> None:
        self.run, self.engine, self.api, self.ledger, self.progress = run, engine, api, ledger, progress
        self.opts, self.settings, self.stats = run.opts, engine.settings, run.stats
        self.sink = run.sink
        self.prompt = run.prompt
        self.stopping = run.stopping
        self.merger = Merger(self.sink, run.prepared.done, self.stats, run.run_id, run.opts.model, prompt=self.prompt)

    def say(self, text: str) -> None:
        """A note on stderr (not with --quiet)."""
        self.run.say(text)

    async def steps(self) -> None:
        """Bring the ledger up to date, send what is left, and wait unless told not to."""
        self.ledger.ensure()
        self.ledger.check_endpoint(self.api.where, str(self.opts.output))
        for sub in self.ledger.live:
            if sub.state == PREPARED:
                # Never uploaded (an earlier run failed or was killed first): its rows are planned afresh below.
                self.ledger.discard(sub)
        self.ledger.tidy()
        for sub in self.ledger.live:
            if sub.state != SUBMITTED and not self.stopping.is_set():
                await self.resume_submission(sub)
        await refresh(self.api, self.ledger, self.collect)
        if not self.stopping.is_set():
            self.resend_early_failures()
            deferred = await self.send()
        else:
            deferred = 0
        if self.settings.wait and not self.stopping.is_set() and any(s.state == SUBMITTED for s in self.ledger.live):
            self.run.phase = RunState.WAITING
            await wait_for_batches(
                self.api,
                self.ledger,
                collect=self.collect,
                progress=self.progress,
                settings=self.settings,
                stopping=self.stopping,
                report=lambda: self.run.write_progress(RunState.WAITING),
            )
        if deferred and not self.stopping.is_set() and not self.ledger.held and self.opts.max_rows is None:
            await self.copy_pass()

    def resend_early_failures(self) -> None:
        """Rows that batches ended before this run's sending came back failed or unprocessed go out again now,
        so they are not this run's final failures: count them out of the summary (the dead letters keep them)."""
        stats = self.stats
        if stats.failed or stats.unfinished:
            refused = f"; {stats.refused:,} refused as sent are not" if stats.refused else ""
            self.say(
                f"{stats.failed - stats.refused:,} failed and {stats.unfinished:,} unprocessed rows of ended batches "
                f"are sent again{refused}"
            )
        stats.failed = stats.unfinished = stats.refused = 0  # the planner counts the refused ones as left out
        stats.failure_counts.clear()
        stats.failures.clear()

    async def resume_submission(self, sub: Submission) -> None:
        """Finish a submission an earlier run left uploaded or creating."""
        self.say(f"resuming {sub.id} ({sub.requests:,} rows), left {sub.state} by an earlier run")
        batch = await submit(self.api, self.ledger, sub, settle=self.engine.settle)
        self.say(f"batch {batch.id} holds {sub.id}")

    async def send(self) -> int:
        """Write request files for the rows still to do, and submit each as soon as it is complete; write the
        copies of texts the sink holds (dedupe). Returns how many rows wait for an original this run sent."""
        opts, ledger = self.opts, self.ledger
        ids: dict[int, str] = {}  # the n-th request file → its submission

        def name(n: int) -> Path:
            ids[n] = new_submission_id()
            return ledger.requests_path(ids[n])

        files = RequestFiles(
            self.prompt,
            opts.model,
            name=name,
            rows_name=lambda n: ledger.rows_path(ids[n]),
            max_requests=self.settings.max_requests,
            max_bytes=self.settings.max_bytes,
        )
        # The Batch API sends each request once: its worst case is its cost. One request per distinct text.
        gate = await self.run.gate(budget=True, dedupe=True)
        live = ledger.live_ids()
        if gate.dedupe is not None:
            await asyncio.to_thread(self.mark_sent, gate.dedupe)
        refused = {} if self.settings.retry_refused else await asyncio.to_thread(refused_requests, self.sink.meta)
        planner = Planner.over(self.run.prepared.source.batches(), gate, live, self.stats, files, refused=refused)
        try:
            while not self.stopping.is_set():
                written = await asyncio.to_thread(planner.next_file, self.engine.stop_planning)
                await self.dead_letter(planner.problems)
                await self.write_copies(planner.copies)
                if written is None and planner.paused:
                    continue
                if written is None:
                    break
                sub = Submission(
                    id=ids[written.number], model=written.model, requests=written.requests, bytes=written.bytes
                )
                ledger.add(sub)
                if self.stopping.is_set():
                    ledger.discard(sub)  # stopping: nothing was sent, so the next run plans these rows afresh
                    break
                self.say(f"sending {sub.requests:,} rows ({written.bytes / 1e6:.1f} MB) as {sub.id}")
                try:
                    batch = await submit(self.api, ledger, sub, settle=self.engine.settle)
                except LabelstreamError:
                    if sub.state == PREPARED:  # the upload failed, or the create was refused: none is at the provider
                        ledger.discard(sub)
                    raise
                self.stats.batches += 1
                self.stats.submitted += sub.requests
                self.say(f"batch {batch.id} created for {sub.id}: {batch.status}")
        finally:
            await asyncio.to_thread(files.discard)
        return planner.deferred

    def mark_sent(self, dedupe: Dedupe) -> None:
        """The texts of batches still at the provider count as sent: rows repeating them wait for their records."""
        for sub in self.ledger.held:
            for row in read_rows(self.ledger.rows_of(sub)):
                dedupe.first(row)

    async def copy_pass(self) -> None:
        """Once this run's batches are collected, the rows that repeat a text they sent copy its record (the
        run's copy pass, run/copies.py). Rows whose original failed wait for the next run."""
        if left := await copy_from_sink(self.run):
            self.say(f"{left:,} rows repeat a text whose request failed: the next run labels them")

    async def write_copies(self, copies: list[Labeled]) -> None:
        """Save the copies the planner made (their originals are in the sink) and count them as labeled."""
        batch, copies[:] = list(copies), []
        await save_copies(self.run, batch)

    async def dead_letter(self, problems: list[Failed]) -> None:
        """Dead-letter rows that cannot be sent (empty text, bad bytes) as the online run does."""
        if problems:
            batch, problems[:] = list(problems), []
            await self.sink.append_dead_letters(batch, self.run.run_id)

    async def collect(self, sub: Submission, batch: Batch) -> None:
        """Bring an ended batch's results into the sink and its failures into the dead letters."""
        outcomes: dict[str, Outcome] = {}
        paths = []
        for what, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
            if file_id:
                path = self.ledger.download_path(sub.id, what)
                await self.api.download(file_id, path)
                paths.append(path)
        await asyncio.to_thread(read_results, self.prompt, paths, outcomes)
        errors = [f"{e.code}: {e.message}" for e in (batch.errors.data or [])] if batch.errors else []
        default = None
        if batch.status == "failed":
            reason = "; ".join(errors[:3]) or "the provider gave no reason"
            default = Outcome(None, "batch_failed", f"batch {batch.id} failed: {reason}")
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at
        latency = max(0, ended - batch.created_at) * 1000.0 if ended else 0.0
        rows_path = self.ledger.rows_of(sub)
        if not rows_path.exists():
            raise BatchError(
                f"{rows_path} is missing, so the results of batch {batch.id} cannot be joined to their rows. Restore "
                f"it; or, to give up on those results and send the rows again, move {self.ledger.meta.batches_path} "
                "aside."
            )
        # A few thousand rows at a time: a 50,000-row batch never sits in memory whole.
        reader = read_rows(rows_path)
        tally = Tally()
        while rows := await asyncio.to_thread(lambda: list(itertools.islice(reader, _ROWS_AT_ONCE))):
            part = await self.merger.merge(rows, outcomes, latency_ms=latency, only_answered=False, default=default)
            tally.add(part)
        self.ledger.record(
            sub, state=COLLECTED, status=batch.status, counts=counts_of(batch), outcome=tally.as_dict(), errors=errors
        )
        self.ledger.drop_files(sub)
        if sub.input_file_id:
            await self.api.delete_file(sub.input_file_id)
        self.say(
            f"batch {batch.id} {batch.status}: {tally.labeled:,} labeled, {tally.failed:,} failed, "
            f"{tally.unfinished:,} unprocessed, {tally.skipped:,} already in the sink"
        )


async def run(opts: RunOptions, *, notice: IO[str] | None = None, **settings: Any) -> Summary:
    """Run the batch engine to the end (or, without `batch.wait`, until its batches are sent)."""
    engine = BatchEngine(settings.get("batch") or BatchSettings())
    return await Run(opts, engine, notice=notice).execute()
