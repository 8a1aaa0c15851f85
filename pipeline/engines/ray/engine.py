"""`labelstream label --engine ray`: the CLI's run, with the labeling done by a Ray Data job.

    read the CSV here (the run's RowGate: done ids, repeats, bad rows, --limit, --max-cost) ─▶ row tables
    put in Ray's object store ─▶ Labeler actors (+ SharedLimit) ─▶ Ray's Parquet writer into OUT.parquet
    (on object storage: into OUT.parquet.meta/staging/<run id>/, committed into the dataset by this driver)

The run around the job is the one every engine has (`pipeline.run.lifecycle.Run`: lock, resume guard,
manifest, done ids, --max-cost, signals, summary), so the output is an ordinary labelstream Parquet sink:
resume by re-running, read it with `status`/`export`.
Ray runs on the cluster in RAY_ADDRESS, or on a local instance with this machine's CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final

import pyarrow as pa

from pipeline.engines.ray.dataset import ROWS_PER_FILE
from pipeline.engines.ray.output import write_args
from pipeline.errors import LabelstreamError, UsageError
from pipeline.results import Failed, Labeled, Row
from pipeline.run.copies import copy_from_sink, copy_of_known, save_copies
from pipeline.run.lifecycle import Run
from pipeline.run.options import RunOptions
from pipeline.run.prepare import Prepared, RowGate, Verdict
from pipeline.run.summary import Summary
from pipeline.sinks.layout import is_jsonl
from pipeline.sinks.objects import ObjectParquetSink
from pipeline.sinks.parquet import ParquetSink
from pipeline.sinks.storage import object_uri
from pipeline.sinks.storage_options import secret_options, shareable_options
from pipeline.stats import RunStats

COMMIT_SECONDS: Final = 5.0  # how often staged parts are committed into an object-store dataset by default
ROWS_PER_TABLE: Final = 500  # rows per block put into Ray's object store: small enough to spread over actors


class RayEngine:
    """Requests from Ray actors: the driver reads and gates the rows, a Ray Data job labels and writes them."""

    name = "ray"
    after_stop = ""

    def __init__(self, actors: int = 2) -> None:
        self.actors = actors
        self.tier = "standard"
        self.shared: Any = None  # the job's SharedLimit actor, once the job is built
        self.started_ray = False

    def check(self, opts: RunOptions) -> None:
        """A Parquet output (credentials for one on object storage not as task arguments), Ray installed, one
        endpoint; Ray spreads the rows itself (no --shard)."""
        if object_uri(opts.output) is not None and (secrets := secret_options()):
            # Ray keeps task arguments in its object store and logs: the workers must find credentials themselves.
            raise UsageError(
                f"--engine ray into {opts.output} cannot hand --storage-option {', '.join(secrets)} to Ray's workers "
                "(Ray stores task arguments). Give the credentials through the environment, set on every Ray node: "
                + (
                    "GOOGLE_APPLICATION_CREDENTIALS for gs://."
                    if str(object_uri(opts.output)).startswith("gs://")
                    else "AWS_ACCESS_KEY_ID, ... or a profile for s3://."
                )
            )
        if importlib.util.find_spec("ray") is None:
            raise UsageError("--engine ray needs Ray Data: pip install 'labelstream[ray]' (plain ray[data]).")
        if is_jsonl(opts.output):
            raise UsageError("--engine ray writes a Parquet dataset: pass --output OUT.parquet.")
        if opts.shard is not None:
            raise UsageError("--engine ray spreads the work over Ray's actors itself; drop --shard / --procs.")
        if len(opts.base_urls) > 1:
            raise UsageError("--engine ray sends to one endpoint; pass --base-url once.")
        self.tier = "flex" if opts.service_tier == "flex" else "standard"

    async def execute(self, run: Run) -> None:
        """Read the rows here, then run the job in a thread (the event loop keeps serving signals and progress);
        then the rows that repeat a text the job sent copy its record from the sink (run/copies.py)."""
        try:
            rows = _put_rows(run, await run.gate(budget=True, dedupe=True), self._put)
            await save_copies(run, rows.copies)  # of texts the sink held before: their originals are in it
            if rows.refs and isinstance(run.sink, ObjectParquetSink):
                await self._label_and_commit(run, rows.refs, run.sink)  # originals are in the dataset once it returns
            elif rows.refs:
                await asyncio.to_thread(self._label, run, rows.refs)
            # With --limit the waiting rows are left: the next run copies them while it reads the input.
            if rows.waiting and not run.stopping.is_set() and run.opts.max_rows is None:
                # Ray's writer saved the originals itself: the run learns their ids from the sink.
                run.prepared.done = await asyncio.to_thread(run.sink.load_done, repair=False)
                if left := await copy_from_sink(run):
                    run.say(f"{left:,} rows repeat a text whose request failed: the next run labels them")
        finally:
            if self.started_ray:
                import ray  # noqa: PLC0415 - the ray extra loads only for --engine ray

                ray.shutdown()  # also ends a job a second Ctrl-C abandoned

    async def _label_and_commit(self, run: Run, refs: list[Any], sink: ObjectParquetSink) -> None:
        """Run the job, which writes its parts into this run's staging prefix, and commit them into the dataset
        every checkpoint interval and once it ends (under the lease; see sinks/staging.py)."""
        job = asyncio.ensure_future(asyncio.to_thread(self._label, run, refs))
        every = run.opts.checkpoint.seconds or COMMIT_SECONDS
        try:
            while True:
                await asyncio.wait({job}, timeout=every)
                # Seen before the commit starts: a part the job writes while a commit runs is caught by the next one,
                # and the last commit begins only once the job has written everything.
                finished = job.done()
                # The last commit takes every run's staging: a write task of a dead run may have PUT its part
                # after this run's start committed the rest (staging.py); its repeated ids are dropped.
                await asyncio.to_thread(sink.commit_staged, run.prepared.done, None if finished else run.run_id)
                if finished:
                    break
        except BaseException:
            if not job.done() and self.shared is not None:
                self.shared.stop.remote()  # the job stops taking batches; its staged parts wait for the next run
            raise
        await job

    def _put(self, run: Run, table: pa.Table) -> Any:
        import ray  # noqa: PLC0415 - the ray extra loads only for --engine ray

        if not ray.is_initialized():
            self.started_ray = _start_ray(run)
        return ray.put(table)

    def _label(self, run: Run, refs: list[Any]) -> None:
        import ray  # noqa: PLC0415

        # Limits learned by earlier runs, named as the online run names them (limit_memory.py), recalled and kept.
        url = run.opts.base_urls[0] if run.opts.base_urls else os.environ.get("OPENAI_BASE_URL")
        memory = run.sink.meta.limit_memory([url], run.opts.model)
        labeled, self.shared = _job(run, refs, actors=self.actors, remembered=memory.recall())
        if run.stopping.is_set():
            self.shared.stop.remote()  # a Ctrl-C while the job was being built
        rows_per_file = run.opts.checkpoint.rows or ROWS_PER_FILE
        if isinstance(run.sink, ObjectParquetSink):
            # Never into the dataset: a write task may outlive this driver (staging.py).
            where = str(run.sink.meta.staging_dir / run.run_id)
            args = write_args(where, rows_per_file=rows_per_file, storage=shareable_options())
        else:
            where = str(run.opts.output)
            args = write_args(where, rows_per_file=rows_per_file, owner=os.getpid())
        try:
            labeled.write_parquet(where, **args)
        except Exception as exc:
            with contextlib.suppress(Exception):  # the job's own failure is the one to report
                totals = ray.get(self.shared.totals.remote(), timeout=30)
                _fold(run.stats, totals)
                if totals.get("learned"):
                    memory.keep(totals["learned"])
            found = _labelstream_error(exc)
            if found is None:
                raise  # a bug, or Ray itself failing: its traceback says which
            raise found from None
        # Not guarded: a run whose counts cannot be read must not report "0 labeled" and succeed.
        totals = ray.get(self.shared.totals.remote(), timeout=30)
        _fold(run.stats, totals)
        if totals.get("learned"):
            memory.keep(totals["learned"])

    def stop(self, run: Run, signals: int) -> bool:
        """First Ctrl-C: actors take no further batch, the rows they hold finish and are written. Second: stop
        now (Ray is shut down; parts already written stay, the rest is left for the next run)."""
        if signals > 1:
            return False
        if self.shared is not None:
            self.shared.stop.remote()
        print("\nlabelstream: stopping: the actors finish the rows they hold. Press Ctrl-C again to stop at once.",
              file=run.notice, flush=True)  # fmt: skip
        return True

    def progress(self) -> dict[str, Any]:
        """Nothing of its own: the counts come from the actors when the job ends."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Nothing of its own."""
        return {}


async def run(opts: RunOptions, *, notice: IO[str] | None = None, **settings: Any) -> Summary:
    """Label what the sink lacks with a Ray Data job; the summary of the run (raises what stopped it)."""
    return await Run(opts, RayEngine(settings.get("actors") or 2), notice=notice).execute()


@dataclass(slots=True)
class _Put:
    """What the driver's read left: the object refs of the rows to send, copies of texts the sink holds, and how
    many rows wait for an original this job sends (copied from the sink after it)."""

    refs: list[Any] = field(default_factory=list)
    copies: list[Labeled] = field(default_factory=list)
    waiting: int = 0


def _put_rows(run: Run, gate: RowGate, put: Callable[[Run, pa.Table], Any]) -> _Put:
    """Read the input here through the run's gate (with --max-cost, each row's worst case is held before it
    goes): the rows to send go to Ray's object store a table at a time (`put`: the driver never holds them all);
    bad rows are dead-lettered; a row repeating a text (dedupe) is not sent."""
    prepared, stats = run.prepared, run.stats
    carry = list(prepared.source.carry)
    out = _Put()
    refs = out.refs
    chunk: list[Row] = []
    problems: list[Failed] = []
    for row in _rows(prepared, gate, run.stopping):
        verdict = gate.classify(row)
        if verdict is Verdict.PROBLEM:
            problems.append(gate.failure(row))
        elif verdict is Verdict.COPY:
            assert gate.dedupe is not None  # noqa: S101 - only a gate with dedupe sorts copies
            copy = copy_of_known(gate.dedupe, row)
            out.waiting += copy is None
            out.copies += [copy] if copy is not None else []
        elif verdict is Verdict.SEND:
            chunk.append(row)
            if len(chunk) >= ROWS_PER_TABLE:
                refs.append(put(run, _table(chunk, carry)))
                chunk = []
    if chunk:
        refs.append(put(run, _table(chunk, carry)))
    if problems:
        prepared.sink.meta.append_dead_letters(problems, run.run_id)
    stats.expected, stats.expected_exact = gate.admitted, True
    return out


def _rows(prepared: Prepared, gate: RowGate, stopping: asyncio.Event) -> Iterator[Row]:
    for batch in prepared.source.batches():
        for row in batch:
            if gate.full or stopping.is_set():
                return
            yield row


def _table(rows: list[Row], carry: list[str]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "text": pa.array([r.text for r in rows], pa.string()),
        "line": pa.array([r.line for r in rows], pa.int64()),
        "truncated": pa.array([r.truncated for r in rows], pa.bool_()),
        "problem": pa.array([None] * len(rows), pa.string()),
    }
    for name in carry:
        columns[name] = pa.array([r.carry.get(name) for r in rows], pa.string())
    return pa.table(columns)


def _start_ray(run: Run) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; True when this run started (and must stop) it."""
    import ray  # noqa: PLC0415 - the ray extra loads only for --engine ray

    if ray.is_initialized():
        return False
    opts = run.opts
    where = os.environ.get("RAY_ADDRESS")
    run.say(f"starting Ray ({'cluster ' + where if where else f'local, {os.cpu_count()} CPUs'})")
    ray.init(address=where or None, include_dashboard=False, log_to_driver=opts.progress != "off",
             logging_level=logging.WARNING)  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = opts.progress == "auto" and sys.stderr.isatty()
    context.print_on_execution_start = False
    return True


def _job(run: Run, refs: list[Any], *, actors: int, remembered: Mapping[str, float]) -> tuple[Any, Any]:
    """The labeling stage over the rows in `refs`, and its SharedLimit actor."""
    import ray  # noqa: PLC0415

    from pipeline.engines.ray.dataset import label_rows  # noqa: PLC0415

    opts, sink = run.opts, run.sink
    assert isinstance(sink, ParquetSink) and sink.schema is not None  # noqa: S101 - check, prepare_run
    limits = opts.limits
    return label_rows(
        ray.data.from_arrow_refs(refs),
        opts.config,
        schema=sink.schema,
        model=opts.model,
        base_url=opts.base_urls[0] if opts.base_urls else None,
        concurrency=None if limits.auto else limits.concurrency,
        rpm=limits.rpm,
        tpm=limits.tpm,
        actors=actors,
        batch_size=None,
        retry=opts.retry,
        dead_letters=str(sink.meta.dead_letters_path),
        storage=shareable_options() if isinstance(sink, ObjectParquetSink) else None,
        service_tier=opts.service_tier,
        run_id=run.run_id,
        remembered=remembered,
    )


def _fold(stats: RunStats, totals: dict[str, Any]) -> None:
    """The job's counters (from the SharedLimit actor) into this run's stats."""
    stats.labeled += totals.get("labeled", 0)
    stats.saved += totals.get("labeled", 0)
    calls = stats.calls
    calls.retries += totals.get("retries", 0)
    calls.rate_limited += totals.get("rate_limited", 0)
    calls.prompt_tokens += totals.get("prompt_tokens", 0)
    calls.completion_tokens += totals.get("completion_tokens", 0)
    calls.cached_tokens += totals.get("cached_tokens", 0)
    for name, value in totals.items():
        if name.startswith("failure:") and value:
            kind = name.removeprefix("failure:")
            stats.failed += value
            stats.failure_counts[kind] = stats.failure_counts.get(kind, 0) + value


def _labelstream_error(exc: BaseException) -> LabelstreamError | None:
    """The labelstream error a Ray failure carries (a bad key in an actor stops the job), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        for candidate in (seen, getattr(seen, "cause", None)):
            if isinstance(candidate, LabelstreamError):
                return candidate
        seen = seen.__cause__ or seen.__context__
    return None
