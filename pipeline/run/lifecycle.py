"""A labeling run: reader → bounded queue → workers → bounded queue → writer, owned by one TaskGroup.

    read_rows ──rows──▶ label_rows × N ──results──▶ write_results ──▶ sink (+ dead letters)
        ▲ RowGate skips done and repeated ids          report_progress reads the counters

Both queues are bounded, so a slow API slows the reader down and memory does not grow with the
input. The sink is the checkpoint: a re-run skips every id it already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.analysis.review import note_review
from pipeline.api.client import LabelClient
from pipeline.api.pricing import Price
from pipeline.errors import FatalApiError, Interrupted, LabelstreamError
from pipeline.ratelimit.limiter import Limiter
from pipeline.ratelimit.share import ShareFollower
from pipeline.results import Failed, Labeled, Result, Row, new_run_id, problem_failure
from pipeline.run.budget import Budget, check_before_start
from pipeline.run.options import RunOptions, resolve_endpoints, resume_after
from pipeline.run.prepare import Prepared, RowGate, Verdict, prepare_run
from pipeline.run.progress import Reporter
from pipeline.run.rowcount import estimate_expected
from pipeline.run.summary import Summary
from pipeline.run.workers import WorkerPool, staff
from pipeline.sinks.progress_file import RunState, end_state, write_progress
from pipeline.stats import CallStats, RunStats
from pipeline.task.config import TaskConfig, load_config
from pipeline.task.prompt import Prompt

_DONE = object()  # the writer's sentinel: every worker has finished


class _Run:
    """The state of one run, shared by its coroutines."""

    def __init__(self, opts: RunOptions, prepared: Prepared, stats: RunStats) -> None:
        self.opts = opts
        self.source = prepared.source
        self.sink = prepared.sink
        self.gate = RowGate(prepared.done, stats, opts.max_rows, shard=opts.shard)
        self.stats = stats
        self.run_id = new_run_id()
        # Bounded, so a slow API slows the reader; a few hundred rows keep even thousands of workers fed (the
        # reader refills them a 512-row batch at a time) without holding thousands of texts in memory.
        self.rows: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=min(512, 2 * opts.limits.concurrency))
        self.results: asyncio.Queue[Result | object] = asyncio.Queue(maxsize=1024)
        self.stopping = asyncio.Event()
        self.finished = asyncio.Event()
        self.pool: WorkerPool | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.counting = threading.Event()  # set: stop counting input lines (the reader knows the count by now)
        self.lines: int | None = None  # newlines in the input, once counted
        self.signals = 0
        self.hard_stop = False
        self.fatal: FatalApiError | None = None
        self.budget: Budget | None = None  # --max-cost
        self.stranded: list[Result] = []  # finished by a worker cancelled while handing it over
        self.limiter: Limiter | None = None
        shard = opts.shard  # a shard takes the part of the key its finished siblings leave (ratelimit/share.py)
        follow = shard is not None and shard.count > 1 and opts.limits.share < 1
        self.share = ShareFollower(opts.output, shard, opts.limits.share) if follow and shard else None
        default_rows, default_seconds = self.sink.default_checkpoint
        self.checkpoint_rows = opts.checkpoint.rows or default_rows
        self.checkpoint_seconds = opts.checkpoint.seconds or default_seconds

    async def read_rows(self) -> None:
        """Stream rows into the bounded queue through the gate, until the input or --limit ends."""
        gate, stats = self.gate, self.stats
        batch_size = 64  # small first batch: the first request should leave within a second
        while not self.stopping.is_set() and not gate.full:
            batch = await asyncio.to_thread(self.source.read_batch, batch_size)
            batch_size = 512
            if not batch:
                break
            for row in batch:
                verdict = gate.sort(row)
                if verdict is Verdict.PROBLEM:
                    failure = problem_failure(row)
                    stats.record_failure(failure.kind, row.id, failure.message)
                    await self.results.put(failure)
                elif verdict is Verdict.SEND:
                    await self.rows.put(row)
                    if self.stopping.is_set() or gate.full:
                        break
            if not self.stopping.is_set():
                self._estimate_expected()
        self.counting.set()
        if not self.stopping.is_set():
            stats.expected, stats.expected_exact = gate.admitted, True
        assert self.pool is not None  # noqa: S101 - started before the reader
        for _ in range(self.pool.close()):
            await self.rows.put(None)

    def _estimate_expected(self) -> None:
        expected = estimate_expected(self.gate, self.stats.read, self.lines, self.source.lines_read)
        if expected is not None:
            self.stats.expected = expected

    async def label_rows(self, client: LabelClient) -> None:
        """One worker: take a row, label it (with retries), pass the result on; stop at the sentinel."""
        while True:
            row = await self.rows.get()
            if row is None:
                return
            if self.stopping.is_set():
                continue  # stopping: rows not yet started are left for the next run
            held = self.budget.reserve(row.text) if self.budget is not None else 0.0
            if held is None:
                self.stopping.set()  # the next request could pass --max-cost: stop as Ctrl-C does
                continue
            try:
                result = await client.label(row)
            except FatalApiError as exc:
                # Every other row would fail the same way: stop, but let the writer save what is finished.
                self.fatal = self.fatal or exc
                self.stop_now()
                return
            if self.budget is not None:
                self.budget.settle(held)
            if isinstance(result, Labeled):
                self.stats.labeled += 1
            else:
                self.stats.record_failure(result.kind, row.id, result.message)
            try:
                await self.results.put(result)
            except asyncio.CancelledError:
                self.stranded.append(result)  # finished work is saved even when its worker is cancelled
                raise

    async def await_workers(self) -> None:
        """Tell the writer when every worker has ended (normally or cancelled after the grace period)."""
        assert self.pool is not None  # noqa: S101 - started before this task
        await self.pool.wait()
        await self.results.put(_DONE)

    async def write_results(self) -> None:
        """Append results to the sink in batches: every `checkpoint_rows` rows or `checkpoint_seconds`."""
        labeled: list[Labeled] = []
        failed: list[Failed] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.checkpoint_seconds

        def keep(item: object) -> None:
            if isinstance(item, Labeled):
                labeled.append(item)
            elif isinstance(item, Failed):
                failed.append(item)

        async def flush() -> None:
            nonlocal deadline, labeled, failed
            batch, dead = labeled, failed
            labeled, failed = [], []
            deadline = loop.time() + self.checkpoint_seconds
            if batch:
                await self.sink.append(batch, saved=self.stats.count_saved)
            if dead:
                await self.sink.append_dead_letters(dead, self.run_id)

        try:
            done = False
            while not done:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self.results.get()
                except TimeoutError:
                    await flush()
                    continue
                # Take what else is ready without waiting, up to a checkpoint's worth.
                while item is not _DONE:
                    keep(item)
                    if len(labeled) >= self.checkpoint_rows:
                        break
                    try:
                        item = self.results.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                done = item is _DONE
                if done or len(labeled) >= self.checkpoint_rows or loop.time() >= deadline:
                    await flush()
        finally:
            # Whatever is finished gets saved, also when this task is cancelled (a third Ctrl-C, a disk error).
            while not self.results.empty():
                keep(self.results.get_nowait())
            for item in self.stranded:
                keep(item)
            self.stranded.clear()
            await flush()
            self.finished.set()

    async def report_progress(self, reporter: Reporter) -> None:
        """Refresh the bar and the progress file about once a second until the writer is done."""
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.opts.progress_every):
                    await self.finished.wait()
            reporter.update()
            await asyncio.to_thread(
                self.write_progress, RunState.STOPPING if self.stopping.is_set() else RunState.RUNNING
            )
            if self.share is not None and self.limiter is not None:
                share = await asyncio.to_thread(self.share.refresh)
                if share is not None:
                    self.limiter.set_share(share)

    async def count_input(self) -> None:
        """Count the input's lines beside the reader: the base of the estimate shown until the reader is done."""
        self.lines = await asyncio.to_thread(self.source.count_lines, self.counting)
        if not self.counting.is_set():
            self._estimate_expected()

    def write_progress(self, state: RunState, **extra: Any) -> None:
        """Replace the progress file (never fatal: progress is a convenience, the sink is the record)."""
        if self.opts.shard is not None:
            extra.setdefault("shard", self.opts.shard.label)
        extra.setdefault("rate_share", self.limiter.share if self.limiter else self.opts.limits.share)
        if self.limiter is not None:
            extra.setdefault("in_flight", self.limiter.in_flight)
            extra.setdefault("window", self.limiter.limit)
        write_progress(
            self.sink.meta,
            self.stats.snapshot(
                state, input=str(self.opts.input), output=str(self.opts.output), run=self.run_id, **extra
            ),
        )

    def on_signal(self, main: asyncio.Task[Any], notice: IO[str]) -> None:
        """Ctrl-C/SIGTERM. First: stop reading, give in-flight rows the grace period. Second: abandon them now
        (the writer still saves what is finished). Third: cancel everything, even a writer stuck on the disk."""
        self.signals += 1
        if self.signals == 1:
            self.stopping.set()
            print(
                f"\nlabelstream: stopping: finishing in-flight requests (up to {self.opts.grace_seconds:g} s), "
                "then saving. Press Ctrl-C again to stop at once.",
                file=notice,
                flush=True,
            )
            asyncio.get_running_loop().call_later(self.opts.grace_seconds, self.stop_now)
            self.write_progress(RunState.STOPPING)
        elif self.signals == 2:
            self.stop_now()
        else:
            self.hard_stop = True
            main.cancel()

    def stop_now(self) -> None:
        """Abandon requests still in flight (their rows stay unlabeled); the writer saves what is finished."""
        self.stopping.set()
        self.counting.set()
        if self.reader_task is not None:
            self.reader_task.cancel()  # it may wait to hand sentinels to workers that are gone
        if self.pool is not None:
            self.pool.cancel()


async def run_label(opts: RunOptions, *, notice: IO[str] | None = None) -> Summary:
    """Run one labeling job to the end (or to a signal) and return its summary."""
    notice = notice or sys.stderr
    api_key, base_urls = resolve_endpoints(opts.api_key, opts.base_urls)
    prepared = prepare_run(opts)
    try:
        if opts.progress != "off":
            for note in prepared.notes:
                print(f"labelstream: {note}", file=notice)
        price = check_before_start(opts, prepared, notice)
        stats = RunStats(
            calls=CallStats(), model=opts.model, tier="flex" if opts.service_tier == "flex" else "standard"
        )
        run = _Run(opts, prepared, stats)
        return await _execute(run, Prompt(opts.config), api_key, base_urls, notice, price=price)
    finally:
        prepared.source.close()
        with contextlib.suppress(LabelstreamError):
            await prepared.sink.close()
        try:
            if opts.review_below is not None:
                note_review(opts, notice)
        finally:
            prepared.sink.meta.unlock()


async def _execute(
    run: _Run,
    prompt: Prompt,
    api_key: str,
    base_urls: tuple[str | None, ...],
    notice: IO[str],
    *,
    price: Price | None,
) -> Summary:
    opts, stats = run.opts, run.stats
    limiter = run.limiter = Limiter(opts.limits).remembering(run.sink.meta.limit_memory(base_urls, opts.model))
    client = LabelClient(
        prompt=prompt,
        limiter=limiter,
        model=opts.model,
        api_key=api_key,
        base_url=base_urls[0] if len(base_urls) == 1 else base_urls,
        retry=opts.retry,
        stats=stats.calls,
        exact_tokens=opts.exact_tokens,
        service_tier=opts.service_tier,
    )
    if price is not None and opts.max_cost is not None:
        run.budget = Budget(opts.max_cost, price, client.tokens.prompt_tokens, opts.config.max_tokens, stats.calls)
    reporter = Reporter(
        stats, mode=opts.progress, stream=notice, concurrency=lambda: (limiter.in_flight, limiter.limit)
    )
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # noqa: S101 - run_label is always awaited inside a task
    handled = _install_signals(loop, lambda: run.on_signal(main, notice))
    error: LabelstreamError | None = None
    await asyncio.to_thread(run.write_progress, RunState.RUNNING)  # before any request: siblings see it at once
    try:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(run.count_input())
                run.pool = WorkerPool(group, lambda: run.label_rows(client), ceiling=limiter.ceiling)
                limiter.on_grow, run.pool.on_close = run.pool.grew, client.input_ended
                group.create_task(staff(run.pool, lambda: limiter.limit))
                run.reader_task = group.create_task(run.read_rows())
                group.create_task(run.await_workers())
                group.create_task(run.write_results())
                group.create_task(run.report_progress(reporter))
        except* LabelstreamError as group_error:
            error = group_error.exceptions[0]  # type: ignore[assignment]  # except* narrows to the class given
    except asyncio.CancelledError:
        if not run.hard_stop:
            raise
        main.uncancel()
    finally:
        _remove_signals(loop, handled)
        reporter.close()
        await client.aclose()
    error = error or run.fatal
    interrupted = run.stopping.is_set() or run.hard_stop
    over = run.budget is not None and run.budget.stopped
    state = end_state(failed=error is not None, over_budget=over, interrupted=interrupted)
    resume = resume_after(opts.resume_command, error)
    summary = Summary.of(
        stats,
        opts=opts,
        state=state,
        error=error,
        dead_letters=str(run.sink.meta.dead_letters_path),
        resume=resume,
        servers=client.endpoints.report(),
    )
    run.write_progress(state, summary=summary.as_dict(), token_scale=round(client.tokens.scale, 4))
    if error is not None:
        print(summary.render(with_error=False), file=notice)  # the error follows once, from whoever catches it
        raise error
    if interrupted:
        print(summary.render(), file=notice)
        raise run.budget.error(resume) if over and run.budget else Interrupted(f"interrupted; resume with: {resume}")
    return summary


def _install_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> list[signal.Signals]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            continue
        installed.append(sig)
    return installed


def _remove_signals(loop: asyncio.AbstractEventLoop, installed: list[signal.Signals]) -> None:
    for sig in installed:
        loop.remove_signal_handler(sig)


def label_csv(input: str | Path, output: str | Path, config: TaskConfig | str | Path, **options: Any) -> Summary:
    """Label a CSV file into a JSONL or Parquet sink, resuming what the sink already holds.

    `config` is a TaskConfig or the path of a task file; `options` are RunOptions fields or the flat names
    `RunOptions.build` sorts into groups (e.g. `limits=LimitSettings(concurrency=50)`, `base_url=...`,
    `max_rows=1000`, `encoding="cp949"`, `checkpoint_rows=500`).
    """
    task = config if isinstance(config, TaskConfig) else load_config(config)
    return asyncio.run(run_label(RunOptions.build(input, output, task, **options)))
