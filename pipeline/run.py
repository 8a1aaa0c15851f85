"""A labeling run: reader → bounded queue → workers → bounded queue → writer, owned by one TaskGroup.

    read_rows ──rows──▶ label_rows × N ──results──▶ write_results ──▶ sink (+ dead letters)
        ▲ skips ids already in the sink             report_progress reads the counters

Both queues are bounded, so a slow API slows the reader down and memory does not grow with the
input. The sink is the checkpoint: a re-run skips every id it already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.client import CallStats, Failed, LabelClient, Labeled
from pipeline.clock import now_iso
from pipeline.config import TaskConfig
from pipeline.errors import FatalApiError, Interrupted, LabelstreamError
from pipeline.idset import IdSet
from pipeline.limits import Limiter
from pipeline.options import RunOptions, identity_of, open_source, resolve_credentials
from pipeline.progress import Reporter, RunStats
from pipeline.prompt import Prompt
from pipeline.sink import Sink, open_sink
from pipeline.source import CsvSource, Row
from pipeline.summary import Summary

_DONE = object()  # the writer's sentinel: every worker has finished


def count_data_lines(path: Path, stop: threading.Event | None = None) -> int:
    """Newlines in the file minus the header: a fast upper estimate of the row count for the ETA.

    Checks `stop` between 1 MiB chunks, so a run that is done or stopping does not wait for a huge file.
    """
    lines = 0
    chunk = b""
    with path.open("rb") as handle:
        while not (stop is not None and stop.is_set()) and (chunk := handle.read(1 << 20)):
            lines += chunk.count(b"\n")
        if handle.tell() and chunk[-1:] != b"\n":
            lines += 1
    return max(0, lines - 1)


def move_aside(sink_path: Path) -> Path | None:
    """Rename an existing sink (and its side files) to `NAME.bak-<time>` so a fresh run starts empty."""
    meta = sink_path.with_name(sink_path.name + ".meta")
    if not sink_path.exists() and not meta.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = sink_path.with_name(f"{sink_path.name}.bak-{stamp}")
    if sink_path.exists():
        sink_path.rename(backup)
    if meta.exists():
        meta.rename(backup.with_name(backup.name + ".meta"))
    return backup


class _Pending:
    """Results waiting for the next checkpoint."""

    def __init__(self) -> None:
        self.labeled: list[Labeled] = []
        self.failed: list[Failed] = []

    def add(self, item: object) -> None:
        if isinstance(item, Labeled):
            self.labeled.append(item)
        elif isinstance(item, Failed):
            self.failed.append(item)

    def take(self) -> tuple[list[Labeled], list[Failed]]:
        taken = self.labeled, self.failed
        self.labeled, self.failed = [], []
        return taken


class _Run:
    """The state of one run, shared by its coroutines."""

    def __init__(self, opts: RunOptions, source: CsvSource, sink: Sink, done: IdSet, stats: RunStats) -> None:
        self.opts = opts
        self.source = source
        self.sink = sink
        self.done = done
        self.seen = IdSet()
        self.stats = stats
        self.run_id = uuid.uuid4().hex[:12]
        self.workers = opts.limits.concurrency
        self.rows: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=2 * self.workers)
        self.results: asyncio.Queue[Labeled | Failed | object] = asyncio.Queue(maxsize=max(64, 2 * self.workers))
        self.stopping = asyncio.Event()
        self.finished = asyncio.Event()
        self.worker_tasks: list[asyncio.Task[None]] = []
        self.reader_task: asyncio.Task[None] | None = None
        self.counting = threading.Event()  # set: stop counting input lines (the reader knows the count by now)
        self.signals = 0
        self.hard_stop = False
        self.fatal: FatalApiError | None = None
        self.stranded: list[Labeled | Failed] = []  # finished by a worker cancelled while handing it over
        default_rows, default_seconds = (5000, 30.0) if sink.suffix == ".parquet" else (1000, 2.0)
        self.checkpoint_rows = opts.checkpoint_rows or default_rows
        self.checkpoint_seconds = opts.checkpoint_seconds or default_seconds

    async def read_rows(self) -> None:
        """Stream rows into the bounded queue, skipping done and repeated ids, until the input or --limit ends."""
        passed, limit = 0, self.opts.limit
        batch_size = 64  # small first batch: the first request should leave within a second
        while not self.stopping.is_set() and (limit is None or passed < limit):
            batch = await asyncio.to_thread(self.source.read_batch, batch_size)
            batch_size = 512
            if not batch:
                break
            for row in batch:
                self.stats.read += 1
                if row.id in self.done:
                    self.stats.skipped_done += 1
                    continue
                if not self.seen.add(row.id):
                    self.stats.duplicates += 1
                    if len(self.stats.duplicate_samples) < 5:
                        self.stats.duplicate_samples.append(f"{row.id} (line {row.line})")
                    continue
                if row.problem:
                    # Not counted against --limit: it costs no request, and a file whose first N rows are
                    # unusable must still move forward batch by batch.
                    failure = Failed(row, row.problem, row.detail, 0, None, now_iso())
                    self.stats.record_failure(failure.kind, row.id, failure.message)
                    await self.results.put(failure)
                    continue
                passed += 1
                self.stats.truncated += row.truncated
                await self.rows.put(row)
                if self.stopping.is_set() or (limit is not None and passed >= limit):
                    break
        self.counting.set()
        if not self.stopping.is_set():
            self.stats.expected = passed  # exact now; the line count was an estimate
        for _ in range(self.workers):
            await self.rows.put(None)

    async def label_rows(self, client: LabelClient) -> None:
        """One worker: take a row, label it (with retries), pass the result on; stop at the sentinel."""
        while True:
            row = await self.rows.get()
            if row is None:
                return
            if self.stopping.is_set():
                continue  # stopping: rows not yet started are left for the next run
            try:
                result = await client.label(row)
            except FatalApiError as exc:
                # Every other row would fail the same way: stop, but let the writer save what is finished.
                self.fatal = self.fatal or exc
                self.stop_now()
                return
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
        await asyncio.wait(self.worker_tasks)
        await self.results.put(_DONE)

    async def write_results(self) -> None:
        """Append results to the sink in batches: every `checkpoint_rows` rows or `checkpoint_seconds`."""
        pending = _Pending()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.checkpoint_seconds

        async def flush() -> None:
            nonlocal deadline
            batch, dead = pending.take()
            deadline = loop.time() + self.checkpoint_seconds
            if batch:
                await self.sink.append(batch)
                self.stats.saved += len(batch)
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
                    pending.add(item)
                    if len(pending.labeled) >= self.checkpoint_rows:
                        break
                    try:
                        item = self.results.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                done = item is _DONE
                if done or len(pending.labeled) >= self.checkpoint_rows or loop.time() >= deadline:
                    await flush()
        finally:
            # Whatever is finished gets saved, also when this task is cancelled (a third Ctrl-C, a disk error).
            while not self.results.empty():
                pending.add(self.results.get_nowait())
            for item in self.stranded:
                pending.add(item)
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
            await asyncio.to_thread(self.write_progress, "stopping" if self.stopping.is_set() else "running")

    async def count_input(self) -> None:
        """Estimate how many rows this run will label, for the ETA; runs beside the reader."""
        lines = await asyncio.to_thread(count_data_lines, self.source.path, self.counting)
        expected = max(0, lines - len(self.done))
        if self.opts.limit is not None:
            expected = min(expected, self.opts.limit)
        self.stats.expected = expected

    def write_progress(self, state: str, **extra: Any) -> None:
        """Replace the progress file (never fatal: progress is a convenience, the sink is the record)."""
        with contextlib.suppress(LabelstreamError):
            self.sink.meta.write_json_atomic(
                self.sink.meta.progress_path,
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
            self.write_progress("stopping")
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
        for task in self.worker_tasks:
            task.cancel()


async def run_label(opts: RunOptions, *, notice: IO[str] | None = None) -> Summary:
    """Run one labeling job to the end (or to a signal) and return its summary."""
    notice = notice or sys.stderr
    api_key, base_url = resolve_credentials(opts.api_key, opts.base_url)
    source = open_source(opts)
    source.open()
    sink = open_sink(opts.output)
    try:
        # Lock first, so a run still writing this sink is never moved aside from under it; the lock file
        # moves with the old side files, so take a fresh one on the new folder afterwards.
        sink.meta.lock()
        if opts.restart:
            backup = move_aside(opts.output)
            sink.meta.unlock()
            sink.meta.lock()
            if backup is not None:
                print(f"labelstream: moved the previous output to {backup} (--skip_labeled False)", file=notice)
        done = await sink.in_io_thread(sink.load_done)
        for note in sink.notes:
            print(f"labelstream: {note}", file=notice)
        prompt = Prompt(opts.config)
        manifest = sink.meta.check_identity(
            identity_of(opts, source),
            has_rows=len(done) > 0 or sink.has_rows(),
            force=opts.force,
            sink_name=str(opts.output),
        )
        if opts.config.id_column and source.id_column is None:
            print(
                f"labelstream: id column {opts.config.id_column!r} is not in the input; ids are content hashes of "
                "the text (stable across runs; identical texts share one label)",
                file=notice,
            )
        if source.missing_carry:
            print(
                f"labelstream: carry columns {list(source.missing_carry)} are not in the input; left out", file=notice
            )
        sink.bind_schema(source.carry, multi_label=opts.config.multi_label)
        stats = RunStats(calls=CallStats(), model=opts.model)
        run = _Run(opts, source, sink, done, stats)
        # How ids and texts were read: `export` rebuilds the same ids from the input with it.
        manifest["input"] = {
            "id_column": source.id_column,
            "text_column": opts.config.text_column,
            "template": opts.config.template,
            "encoding": source.encoding,
            "delimiter": source.delimiter,
        }
        manifest.setdefault("runs", []).append({"run": run.run_id, "started_at": now_iso(), "model": opts.model})
        sink.meta.write_manifest(manifest)
        return await _execute(run, prompt, api_key, base_url, notice)
    finally:
        source.close()
        with contextlib.suppress(LabelstreamError):
            await sink.close()
        sink.meta.unlock()


async def _execute(run: _Run, prompt: Prompt, api_key: str, base_url: str | None, notice: IO[str]) -> Summary:
    opts, stats = run.opts, run.stats
    limiter = Limiter(opts.limits)
    client = LabelClient(
        prompt=prompt,
        limiter=limiter,
        model=opts.model,
        api_key=api_key,
        base_url=base_url,
        retry=opts.retry,
        stats=stats.calls,
        exact_tokens=opts.exact_tokens,
    )
    reporter = Reporter(
        stats,
        enabled=opts.progress,
        stream=notice,
        concurrency=lambda: f"{limiter.in_flight}/{limiter.limit}",
    )
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # noqa: S101 - run_label is always awaited inside a task
    handled = _install_signals(loop, lambda: run.on_signal(main, notice))
    error: LabelstreamError | None = None
    try:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(run.count_input())
                run.reader_task = group.create_task(run.read_rows())
                run.worker_tasks = [group.create_task(run.label_rows(client)) for _ in range(run.workers)]
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
    state = "failed" if error else "interrupted" if interrupted else "done"
    summary = Summary.of(run, state=state, error=error)
    run.write_progress(state, summary=summary.as_dict())
    if error is not None:
        print(summary.render(), file=notice)
        raise error
    if interrupted:
        print(summary.render(), file=notice)
        raise Interrupted(f"interrupted; resume with: {opts.resume_command}")
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


def label_csv(
    input: str | Path,
    output: str | Path,
    config: TaskConfig | str | Path,
    **options: Any,
) -> Summary:
    """Label a CSV file into a JSONL or Parquet sink, resuming what the sink already holds.

    `config` is a TaskConfig or the path of a task file; `options` are RunOptions fields
    (e.g. `limits=LimitSettings(concurrency=50)`, `base_url=...`, `limit=1000`).
    """
    from pipeline.config import load_config  # noqa: PLC0415 - only the library entry point needs it

    task = config if isinstance(config, TaskConfig) else load_config(config)
    opts = RunOptions(input=Path(input), output=Path(output), config=task, **options)
    return asyncio.run(run_label(opts))
