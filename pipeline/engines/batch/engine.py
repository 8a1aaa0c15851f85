"""`labelstream label --engine batch`: the rows a sink lacks, labeled through the OpenAI Batch API.

    prepare_run ─▶ finish half-done submissions ─▶ collect ended batches ─▶ plan + submit the rest ─▶ wait, collect

Every run first brings the ledger up to date (submissions a crash left half-way are completed, batches that
ended are collected), then sends the rows no one has done or holds, then (unless --no-wait) polls until its
batches end. So re-running the same command after a crash, or after --no-wait, always carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
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
from pipeline.errors import BatchError, Interrupted, LabelstreamError, UsageError
from pipeline.results import Failed, new_run_id
from pipeline.run.options import RunOptions, resolve_credentials
from pipeline.run.prepare import Prepared, RowGate, prepare_run
from pipeline.run.summary import Summary
from pipeline.sinks.progress_file import RunState, end_state, write_progress
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import Prompt

_ROWS_AT_ONCE = 5000  # rows of a batch read and settled at a time


class _BatchRun:
    """One batch-engine run: the prepared sink, its ledger, and the way to stop."""

    def __init__(
        self,
        opts: RunOptions,
        *,
        settings: BatchSettings,
        prepared: Prepared,
        stats: RunStats,
        api: BatchApi,
        notice: IO[str],
    ) -> None:
        self.opts, self.settings, self.prepared, self.stats, self.api = opts, settings, prepared, stats, api
        self.notice = notice
        self.sink = prepared.sink
        self.ledger = Ledger(self.sink.meta)
        self.prompt = Prompt(opts.config)
        self.run_id = new_run_id()
        self.merger = Merger(self.sink, prepared.done, stats, self.run_id, opts.model, prompt=self.prompt)
        self.stopping = asyncio.Event()
        self.stop_planning = threading.Event()
        self.signals = 0
        self.hard_stop = False
        self.settle = SETTLE_SECONDS
        self.progress = BatchProgress(mode=opts.progress, stream=notice)

    def say(self, text: str) -> None:
        """A note on stderr (not with --quiet)."""
        if self.opts.progress != "off":
            print(f"labelstream: {text}", file=self.notice, flush=True)

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
            await self.send()
        if self.settings.wait and not self.stopping.is_set() and any(s.state == SUBMITTED for s in self.ledger.live):
            self.write_progress(RunState.WAITING)
            await wait_for_batches(
                self.api,
                self.ledger,
                collect=self.collect,
                progress=self.progress,
                settings=self.settings,
                stopping=self.stopping,
                report=lambda: self.write_progress(RunState.WAITING),
            )

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
        batch = await submit(self.api, self.ledger, sub, settle=self.settle)
        self.say(f"batch {batch.id} holds {sub.id}")

    async def send(self) -> None:
        """Write request files for the rows still to do, and submit each as soon as it is complete."""
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
        gate = RowGate(self.prepared.done, self.stats, opts.max_rows, shard=opts.shard)
        live = ledger.live_ids()
        refused = {} if self.settings.retry_refused else await asyncio.to_thread(refused_requests, self.sink.meta)
        planner = Planner.over(self.prepared.source.batches(), gate, live, self.stats, files, refused=refused)
        try:
            while not self.stopping.is_set():
                written = await asyncio.to_thread(planner.next_file, self.stop_planning)
                await self.dead_letter(planner.problems)
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
                    batch = await submit(self.api, ledger, sub, settle=self.settle)
                except LabelstreamError:
                    if sub.state == PREPARED:  # the upload failed, or the create was refused: none is at the provider
                        ledger.discard(sub)
                    raise
                self.stats.batches += 1
                self.stats.submitted += sub.requests
                self.say(f"batch {batch.id} created for {sub.id}: {batch.status}")
        finally:
            await asyncio.to_thread(files.discard)

    async def dead_letter(self, problems: list[Failed]) -> None:
        """Dead-letter rows that cannot be sent (empty text, bad bytes) as the online run does."""
        if problems:
            batch, problems[:] = list(problems), []
            await self.sink.append_dead_letters(batch, self.run_id)

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
        rows_path = self.ledger.rows_path(sub.id)
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

    def write_progress(self, state: RunState, **extra: Any) -> None:
        """Replace the progress file (never fatal)."""
        self.stats.pending = sum(s.requests for s in self.ledger.held)
        write_progress(
            self.sink.meta,
            self.stats.snapshot(
                state, input=str(self.opts.input), output=str(self.opts.output), run=self.run_id,
                engine="batch", batches=self.progress.as_dict(), **extra,
            ),
        )  # fmt: skip

    def on_signal(self, main: asyncio.Task[Any]) -> None:
        """First Ctrl-C: finish the step under way (an upload, a create, a collection), then stop; batches keep
        running at the provider. Second: stop at once (the ledger is consistent after any step)."""
        self.signals += 1
        if self.signals == 1:
            self.stopping.set()
            self.stop_planning.set()
            print(
                "\nlabelstream: stopping after the step under way; batches already sent keep running at the provider. "
                "Press Ctrl-C again to stop at once.",
                file=self.notice,
                flush=True,
            )
        else:
            self.hard_stop = True
            main.cancel()


async def run_batch(
    opts: RunOptions, settings: BatchSettings, *, notice: IO[str] | None = None, stats: RunStats | None = None
) -> Summary:
    """Run the batch engine to the end (or, without `settings.wait`, until its batches are sent)."""
    notice = notice or sys.stderr
    if len(opts.base_urls) > 1:
        raise UsageError("--engine batch sends to one endpoint; pass --base-url once.")
    api_key, base_url = resolve_credentials(opts.api_key, opts.base_urls[0] if opts.base_urls else None)
    prepared = prepare_run(opts)
    api = BatchApi(api_key=api_key, base_url=base_url)
    try:
        if opts.progress != "off":
            for note in prepared.notes:
                print(f"labelstream: {note}", file=notice)
        stats = stats or RunStats(calls=CallStats(), model=opts.model)
        run = _BatchRun(opts, settings=settings, prepared=prepared, stats=stats, api=api, notice=notice)
        return await _execute(run)
    finally:
        await api.aclose()
        prepared.source.close()
        with contextlib.suppress(LabelstreamError):
            await prepared.sink.close()
        prepared.sink.meta.unlock()


async def _execute(run: _BatchRun) -> Summary:
    main = asyncio.current_task()
    assert main is not None  # noqa: S101 - run_batch is always awaited inside a task
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, run.on_signal, main)
            handled.append(sig)
    error: LabelstreamError | None = None
    try:
        try:
            await run.steps()
        except LabelstreamError as exc:
            error = exc
    except asyncio.CancelledError:
        if not run.hard_stop:
            raise
        main.uncancel()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        run.progress.close()
    interrupted = run.stopping.is_set() or run.hard_stop
    state = end_state(failed=error is not None, interrupted=interrupted)
    run.stats.pending = sum(s.requests for s in run.ledger.held)
    summary = Summary.of(
        run.stats,
        opts=run.opts,
        state=state,
        error=error,
        dead_letters=str(run.sink.meta.dead_letters_path),
        resume=run.opts.resume_command,
        engine="batch",
    )
    run.write_progress(state, summary=summary.as_dict())
    if error is not None:
        print(summary.render(with_error=False), file=run.notice)  # the error follows once, from whoever catches it
        raise error
    if interrupted:
        print(summary.render(), file=run.notice)
        raise Interrupted(f"interrupted; batches already sent keep running. Resume with: {run.opts.resume_command}")
    return summary
