"""`labelstream label --engine ray`: the CLI's run, with the labeling done by a Ray Data job.

    prepare_run ─▶ read the CSV here (RowGate: done ids, repeats, bad rows, --limit) ─▶ row tables put in
    Ray's object store ─▶ Labeler actors (+ SharedLimit) ─▶ Ray's Parquet writer into OUT.parquet

The sink is prepared exactly as for the online engine (lock, resume guard, manifest, done ids), so the
output is an ordinary labelstream Parquet sink: resume by re-running, read it with `status`/`export`.
Ray runs on the cluster in RAY_ADDRESS, or on a local instance with this machine's CPUs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any, Final

import pyarrow as pa

from pipeline.errors import FatalApiError, Interrupted, LabelstreamError, UsageError
from pipeline.results import Failed, Row, new_run_id, problem_failure
from pipeline.run.options import RunOptions, resume_after
from pipeline.run.prepare import Prepared, RowGate, Verdict, prepare_run
from pipeline.run.summary import Summary
from pipeline.sinks.layout import is_jsonl
from pipeline.sinks.parquet import ParquetSink
from pipeline.sinks.progress_file import RunState, write_progress
from pipeline.stats import CallStats, RunStats

ROWS_PER_TABLE: Final = 500  # rows per block put into Ray's object store: small enough to spread over actors


def run_ray(opts: RunOptions, *, actors: int, notice: IO[str] | None = None) -> Summary:
    """Label what the sink lacks with a Ray Data job; the summary of the run (raises on a fatal error)."""
    notice = notice or sys.stderr
    _check(opts)
    prepared = prepare_run(opts)
    stats = RunStats(calls=CallStats(), model=opts.model, tier="flex" if opts.service_tier == "flex" else "standard")
    run_id = new_run_id()
    error: LabelstreamError | None = None
    state = RunState.DONE
    started_ray = False
    try:
        say = _sayer(opts, notice)
        for note in prepared.notes:
            say(note)

        def put(table: pa.Table) -> Any:
            nonlocal started_ray
            import ray  # noqa: PLC0415 - the ray extra loads only for --engine ray

            if not ray.is_initialized():
                started_ray = _start_ray(opts, say)
            return ray.put(table)

        refs = _put_rows(prepared, opts, stats, run_id, put)
        if refs:
            try:
                _label(prepared, opts, refs, stats, actors=actors, run_id=run_id)
            except KeyboardInterrupt:
                state = RunState.INTERRUPTED
    except LabelstreamError as exc:
        error, state = exc, RunState.FAILED
    finally:
        prepared.source.close()
        prepared.sink.meta.close()
        if started_ray:
            import ray  # noqa: PLC0415

            ray.shutdown()
        prepared.sink.meta.unlock()
    summary = Summary.of(
        stats,
        opts=opts,
        state=state,
        error=error,
        dead_letters=str(prepared.sink.meta.dead_letters_path),
        resume=resume_after(opts.resume_command, error),
        engine="ray",
    )
    write_progress(
        prepared.sink.meta,
        stats.snapshot(
            state, input=str(opts.input), output=str(opts.output), run=run_id, engine="ray", summary=summary.as_dict()
        ),
    )
    if error is not None or state is RunState.INTERRUPTED:
        print(summary.render(with_error=error is None), file=notice)  # the raised error is printed once, after
    if error is not None:
        raise error
    if state is RunState.INTERRUPTED:
        raise Interrupted(f"interrupted; resume with: {opts.resume_command}")
    return summary


def _check(opts: RunOptions) -> None:
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--engine ray needs Ray Data: pip install 'labelstream[ray]' (plain ray[data]).")
    if is_jsonl(opts.output):
        raise UsageError("--engine ray writes a Parquet dataset: pass --output OUT.parquet.")
    if opts.shard is not None:
        raise UsageError("--engine ray spreads the work over Ray's actors itself; drop --shard / --procs.")
    if len(opts.base_urls) > 1:
        raise UsageError("--engine ray sends to one endpoint; pass --base-url once.")
    if opts.max_cost is not None:
        raise UsageError("--max-cost is not enforced by --engine ray yet; estimate first with --dry-run.")


def _sayer(opts: RunOptions, notice: IO[str]) -> Any:
    def say(text: str) -> None:
        if opts.progress != "off":
            print(f"labelstream: {text}", file=notice, flush=True)

    return say


def _put_rows(prepared: Prepared, opts: RunOptions, stats: RunStats, run_id: str, put: Any) -> list[Any]:
    """Read the input here, as the online engine does: the rows to send go to Ray's object store a table at
    a time (`put`: the driver never holds them all); bad rows are dead-lettered. Returns the object refs."""
    gate = RowGate(prepared.done, stats, opts.max_rows, redo=prepared.redo)
    carry = list(prepared.source.carry)
    refs: list[Any] = []
    chunk: list[Row] = []
    problems: list[Failed] = []
    for row in _rows(prepared, gate):
        verdict = gate.sort(row)
        if verdict is Verdict.PROBLEM:
            failed = problem_failure(row)
            stats.record_failure(failed.kind, row.id, failed.message)
            problems.append(failed)
        elif verdict is Verdict.SEND:
            chunk.append(row)
            if len(chunk) >= ROWS_PER_TABLE:
                refs.append(put(_table(chunk, carry)))
                chunk = []
    if chunk:
        refs.append(put(_table(chunk, carry)))
    if problems:
        prepared.sink.meta.append_dead_letters(problems, run_id)
    stats.expected, stats.expected_exact = gate.admitted, True
    return refs


def _rows(prepared: Prepared, gate: RowGate) -> Iterator[Row]:
    for batch in prepared.source.batches():
        for row in batch:
            if gate.full:
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


def _start_ray(opts: RunOptions, say: Any) -> bool:
    """Connect to RAY_ADDRESS or start a local Ray; True when this run started (and must stop) it."""
    import ray  # noqa: PLC0415 - the ray extra loads only for --engine ray

    if ray.is_initialized():
        return False
    where = os.environ.get("RAY_ADDRESS")
    say(f"starting Ray ({'cluster ' + where if where else f'local, {os.cpu_count()} CPUs'})")
    ray.init(address=where or None, include_dashboard=False, log_to_driver=opts.progress != "off",
             logging_level=logging.WARNING)  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = opts.progress == "auto" and sys.stderr.isatty()
    context.print_on_execution_start = False
    return True


def _label(prepared: Prepared, opts: RunOptions, refs: list[Any], stats: RunStats, **how: Any) -> None:
    import ray  # noqa: PLC0415

    from pipeline.engines.ray.dataset import ROWS_PER_FILE, label_rows  # noqa: PLC0415
    from pipeline.engines.ray.output import write_args  # noqa: PLC0415

    sink = prepared.sink
    assert isinstance(sink, ParquetSink) and sink.schema is not None  # noqa: S101 - _check, prepare_run
    schema = sink.schema
    rows = ray.data.from_arrow_refs(refs)
    limits = opts.limits
    labeled, shared = label_rows(
        rows,
        opts.config,
        schema=schema,
        model=opts.model,
        base_url=opts.base_urls[0] if opts.base_urls else None,
        concurrency=None if limits.auto else limits.concurrency,
        rpm=limits.rpm,
        tpm=limits.tpm,
        actors=how["actors"],
        batch_size=None,
        retry=opts.retry,
        dead_letters=str(prepared.sink.meta.dead_letters_path),
        service_tier=opts.service_tier,
        run_id=how["run_id"],
    )
    where = str(opts.output)
    try:
        rows_per_file = opts.checkpoint.rows or ROWS_PER_FILE
        labeled.write_parquet(where, **write_args(where, rows_per_file=rows_per_file, owner=os.getpid()))
    except Exception as exc:  # noqa: BLE001 - a Ray job fails with many types; ours ride inside them
        raise _labelstream_error(exc) from None
    finally:
        with contextlib.suppress(Exception):
            _fold(stats, ray.get(shared.totals.remote(), timeout=30))


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


def _labelstream_error(exc: BaseException) -> LabelstreamError:
    """The labelstream error a Ray failure carries (a bad key in an actor stops the job), else a plain one."""
    seen: BaseException | None = exc
    while seen is not None:
        for candidate in (seen, getattr(seen, "cause", None)):
            if isinstance(candidate, LabelstreamError):
                return candidate
        seen = seen.__cause__ or seen.__context__
    return FatalApiError(f"the Ray job failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
