"""The online engine: reader → bounded queue → workers → bounded queue → writer, owned by one TaskGroup.

    read_rows ──rows──▶ label_rows × N ──results──▶ write_results ──▶ sink (+ dead letters)
        ▲ the run's RowGate skips done and repeated ids       report_progress keeps the bar and the rate share

Both queues are bounded, so a slow API slows the reader down and memory does not grow with the input. The
sink is the checkpoint: a re-run skips every id it already holds. Everything around the requests (the sink's
preparation, signals, the budget, the summary) is the run's (`pipeline.run.lifecycle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import IO, Any

from pipeline.api.client import LabelClient
from pipeline.engines.workers import WorkerPool, keep_pool_sized
from pipeline.errors import FatalApiError, LabelstreamError
from pipeline.ratelimit.limiter import Limiter
from pipeline.ratelimit.share import ShareFollower
from pipeline.results import Failed, Labeled, Result, Row
from pipeline.run.lifecycle import Run
from pipeline.run.options import RunOptions, resolve_endpoints
from pipeline.run.prepare import RowGate, Verdict
from pipeline.run.progress import Reporter
from pipeline.run.rowcount import estimate_expected
from pipeline.run.summary import Summary

_FIRST_BATCH = 64  # rows: the first request should leave within a second
_BATCH = 512


class OnlineEngine:
    """Requests as the rows come, as many in flight as the limiter allows (see the module docstring)."""

    name = "online"
    after_stop = ""

    def __init__(self) -> None:
        self.tier = "standard"
        self.share = 1.0
        self.api_key = ""
        self.base_urls: tuple[str | None, ...] = ()
        self.client: LabelClient | None = None
        self.limiter: Limiter | None = None
        self.lines: _Pipeline | None = None

    def check(self, opts: RunOptions) -> None:
        """A missing key or a bad endpoint is an error before the sink is touched."""
        self.tier = "flex" if opts.service_tier == "flex" else "standard"
        self.share = opts.limits.share  # what the progress file says before the limiter exists
        self.api_key, self.base_urls = resolve_endpoints(opts.api_key, opts.base_urls)

    async def execute(self, run: Run) -> None:
        """Label every row the gate lets through, until the input, --limit or a stop ends it."""
        opts = run.opts
        _note_running_batches(run)
        gate = await run.gate(dedupe=True)  # the dedupe pass, before any worker starts
        limiter = self.limiter = Limiter(opts.limits).remembering(
            run.sink.meta.limit_memory(self.base_urls, opts.model)
        )
        client = self.client = LabelClient(
            prompt=run.prompt,
            limiter=limiter,
            model=opts.model,
            api_key=self.api_key,
            base_url=self.base_urls[0] if len(self.base_urls) == 1 else self.base_urls,
            retry=opts.retry,
            stats=run.stats.calls,
            exact_tokens=opts.exact_tokens,
            service_tier=opts.service_tier,
        )
        if run.budget is not None:
            run.budget.prompt_tokens = client.tokens.prompt_tokens  # learns the provider's counts as replies come
            client.hedger.budget = run.budget  # a hedge copy holds its worst case too, or is not sent
        reporter = Reporter(
            run.stats, mode=opts.progress, stream=run.notice, concurrency=lambda: (limiter.in_flight, limiter.limit)
        )
        lines = self.lines = _Pipeline(run, client, limiter, gate)
        error: LabelstreamError | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(lines.count_input())
                lines.pool = WorkerPool(group, lines.label_rows, ceiling=limiter.ceiling)
                limiter.on_grow, lines.pool.on_close = lines.pool.grew, client.input_ended
                group.create_task(keep_pool_sized(lines.pool, lambda: limiter.limit))
                lines.reader_task = group.create_task(lines.read_rows())
                group.create_task(lines.await_workers(client))
                group.create_task(lines.write_results())
                group.create_task(lines.report_progress(reporter))
        except* LabelstreamError as group_error:
            error = group_error.exceptions[0]  # type: ignore[assignment]  # except* narrows to the class given
        finally:
            reporter.close()
            await client.aclose()
        if error or lines.fatal:
            raise error or lines.fatal  # type: ignore[misc]  # one of them is set

    def stop(self, run: Run, signals: int) -> bool:
        """First: stop reading, give in-flight rows the grace period. Second: abandon them now (the writer
        still saves what is finished). Third: cancel everything, even a writer stuck on the disk."""
        if signals == 1:
            grace = run.opts.grace_seconds
            print(
                f"\nlabelstream: stopping: finishing in-flight requests (up to {grace:g} s), then saving. "
                "Press Ctrl-C again to stop at once.",
                file=run.notice,
                flush=True,
            )
            asyncio.get_running_loop().call_later(grace, self.stop_now)
            return True
        if signals == 2:
            self.stop_now()
            return True
        return False

    def stop_now(self) -> None:
        """Abandon requests still in flight (their rows stay unlabeled); the writer saves what is finished."""
        if self.lines is not None:
            self.lines.stop_now()

    def progress(self) -> dict[str, Any]:
        """The window and this process's rate share (siblings on one key read them: ratelimit/share.py)."""
        limiter = self.limiter
        fields: dict[str, Any] = {"rate_share": limiter.share if limiter else self.share}
        if limiter is not None:
            fields.update(in_flight=limiter.in_flight, window=limiter.limit)
        if self.client is not None:
            fields["token_scale"] = round(self.client.tokens.scale, 4)
        return fields

    def summary(self) -> dict[str, Any]:
        """Per-server counts of a fleet."""
        return {"servers": self.client.endpoints.report()} if self.client is not None else {}


_DONE = object()  # the writer's sentinel: every worker has finished


class _Pipeline:
    """The queues and coroutines of one online run."""

    def __init__(self, run: Run, client: LabelClient, limiter: Limiter, gate: RowGate) -> None:
        opts = run.opts
        self.run, self.client, self.limiter = run, client, limiter
        self.source = run.prepared.source
        self.gate = gate
        self.dedupe = gate.dedupe
        self.stats = run.stats
        self.stopping = run.stopping
        # Bounded, so a slow API slows the reader; a few hundred rows keep even thousands of workers fed (the
        # reader refills them a 512-row batch at a time) without holding thousands of texts in memory.
        self.rows: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=min(512, 2 * opts.limits.concurrency))
        self.results: asyncio.Queue[Result | object] = asyncio.Queue(maxsize=1024)
        self.finished = asyncio.Event()
        self.pool: WorkerPool | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.counting = threading.Event()  # set: stop counting input lines (the reader knows the count by now)
        self.lines: int | None = None  # newlines in the input, once counted
        self.fatal: FatalApiError | None = None
        self.stranded: list[Result] = []  # finished by a worker cancelled while handing it over
        shard = opts.shard  # a shard takes the part of the key its finished siblings leave (ratelimit/share.py)
        follow = shard is not None and shard.count > 1 and opts.limits.share < 1
        self.share = ShareFollower(opts.output, shard, opts.limits.share) if follow and shard else None
        default_rows, default_seconds = run.sink.default_checkpoint
        self.checkpoint_rows = opts.checkpoint.rows or default_rows
        self.checkpoint_seconds = opts.checkpoint.seconds or default_seconds

    async def read_rows(self) -> None:
        """Stream rows into the bounded queue through the gate, until the input or --limit ends."""
        gate, stats = self.gate, self.stats
        batch_size = _FIRST_BATCH
        while not self.stopping.is_set() and not gate.full:
            batch = await asyncio.to_thread(self.source.read_batch, batch_size)
            batch_size = _BATCH
            if not batch:
                break
            for row in batch:
                verdict = gate.classify(row)
                if verdict is Verdict.PROBLEM:
                    await self.pass_on([gate.failure(row)], counted=True)
                elif verdict is Verdict.SEND:
                    await self.rows.put(row)
                elif verdict is Verdict.COPY:
                    assert self.dedupe is not None  # noqa: S101 - only a gate with dedupe sorts copies
                    if (copy := self.dedupe.copy_now(row)) is not None:
                        stats.copies += 1
                        await self.pass_on([copy], copies=True)  # its original was handed to the writer before
                if verdict in (Verdict.SEND, Verdict.COPY) and (self.stopping.is_set() or gate.full):
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

    async def label_rows(self) -> None:
        """One worker: take a row, label it (with retries), pass the result on; stop at the sentinel."""
        budget = self.run.budget
        while True:
            row = await self.rows.get()
            if row is None:
                return
            if self.stopping.is_set():
                continue  # stopping: rows not yet started are left for the next run
            held = budget.reserve(row.text) if budget is not None else 0.0
            if held is None:
                self.stopping.set()  # the next request could pass --max-cost: stop as Ctrl-C does
                continue
            try:
                result = await self.client.label(row)
            except FatalApiError as exc:
                # Every other row would fail the same way: stop, but let the writer save what is finished.
                self.fatal = self.fatal or exc
                self.stop_now()
                return
            finally:
                # Released however the request ended: an abandoned attempt's worst case is already in the
                # spend (the client counts it), so holding it too would count it twice.
                if budget is not None:
                    budget.settle(held)
            await self.pass_on(self.client.watch.sift(result))  # a row failed as all replies so far waits (failures.py)

    async def pass_on(self, results: Sequence[Result], *, counted: bool = False, copies: bool = False) -> None:
        """Count finished rows (unless `counted` already) and hand them to the writer; then the `copies` that
        waited for them (run/dedupe.py), after them, so the sink never holds a copy without its original."""
        if not counted:
            self.stats.count(*results)
        for at, result in enumerate(results):
            try:
                await self.results.put(result)
            except asyncio.CancelledError:
                self.stranded.extend(results[at:])  # finished work is saved even when its worker is cancelled
                raise
        if self.dedupe is not None and not copies and (followers := self._copies_of(results)):
            await self.pass_on(followers, copies=True)

    def _copies_of(self, results: Sequence[Result]) -> list[Result]:
        """The records of the rows that waited for these originals: copies, or dead letters if they failed."""
        assert self.dedupe is not None  # noqa: S101 - called with dedupe only
        followers = [item for result in results for item in self.dedupe.settle(result)]
        self.stats.copies += sum(isinstance(item, Labeled) for item in followers)
        return followers

    async def await_workers(self, client: LabelClient) -> None:
        """Tell the writer when every worker has ended (normally or cancelled after the grace period)."""
        assert self.pool is not None  # noqa: S101 - started before this task
        await self.pool.wait()
        await self.pass_on(client.watch.settle())  # rows held back: dead letters unless a streak stopped us
        await self.results.put(_DONE)

    async def write_results(self) -> None:
        """Append results to the sink in batches: every `checkpoint_rows` rows or `checkpoint_seconds`."""
        sink, run_id = self.run.sink, self.run.run_id
        every_rows, every_seconds = self.checkpoint_rows, self.checkpoint_seconds
        labeled: list[Labeled] = []
        failed: list[Failed] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + every_seconds

        def keep(item: object) -> None:
            if isinstance(item, Labeled):
                labeled.append(item)
            elif isinstance(item, Failed):
                failed.append(item)

        async def flush() -> None:
            nonlocal deadline, labeled, failed
            batch, dead = labeled, failed
            labeled, failed = [], []
            deadline = loop.time() + every_seconds
            if batch:
                await sink.append(batch, saved=self.stats.count_saved)
            if dead:
                await sink.append_dead_letters(dead, run_id)

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
                    if len(labeled) >= every_rows:
                        break
                    try:
                        item = self.results.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                done = item is _DONE
                if done or len(labeled) >= every_rows or loop.time() >= deadline:
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
        """Refresh the bar about once a second, and this shard's part of the key, until the writer is done."""
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.run.opts.progress_every):
                    await self.finished.wait()
            reporter.update()
            if self.share is not None:
                share = await asyncio.to_thread(self.share.refresh)
                if share is not None:
                    self.limiter.set_share(share)

    async def count_input(self) -> None:
        """Count the input's lines beside the reader: the base of the estimate shown until the reader is done."""
        self.lines = await asyncio.to_thread(self.source.count_lines, self.counting)
        if not self.counting.is_set():
            self._estimate_expected()

    def stop_now(self) -> None:
        """Abandon requests still in flight (their rows stay unlabeled); the writer saves what is finished."""
        self.stopping.set()
        self.counting.set()
        if self.reader_task is not None:
            self.reader_task.cancel()  # it may wait to hand sentinels to workers that are gone
        if self.pool is not None:
            self.pool.cancel()


async def run(opts: RunOptions, *, notice: IO[str] | None = None, **_settings: Any) -> Summary:
    """Run the online engine to the end (or to a signal) and return its summary."""
    return await Run(opts, OnlineEngine(), notice=notice).execute()


def _note_running_batches(run: Run) -> None:
    """Labeling online rows that batches still hold pays twice: say so (a note; the run goes on). Read once the
    run holds the sink, so that a store that cannot be reached is reported by the lease, with its one retry."""
    from pipeline.engines.batch.ledger import Ledger  # noqa: PLC0415 - only a sink that has batches needs it

    live = 0
    with contextlib.suppress(LabelstreamError):  # a note only: a damaged or unreadable ledger is not this run's stop
        live = sum(sub.requests for sub in Ledger(run.sink.meta).held)
    if live:
        run.say(
            f"note: {live:,} rows of {run.opts.output} are in batches still running; labeling them online too pays "
            "twice. `--engine batch` collects them."
        )
