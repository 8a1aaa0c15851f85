"""One labeling run, whichever engine carries its requests.

    engine.check ─▶ prepare_run (lock, resume guard, manifest, done ids) ─▶ notes ─▶ --max-cost check
        ─▶ signals ─▶ engine.execute(run): send and collect ─▶ state ─▶ progress file ─▶ summary, exit ─▶ teardown

`Run` owns everything every engine shares, so that exactly once, dead letters, the config guard, --max-cost,
Ctrl-C and the exit code are written once. An engine (`pipeline.engines`: online, batch, ray) supplies only
how requests travel: it reads rows through `run.gate()`, sends them, and writes results into `run.sink`.
This module never imports an engine; the command or library entry picks one and hands it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, Protocol

from pipeline.analysis.review import note_review
from pipeline.api.tokens import TokenEstimator
from pipeline.errors import Interrupted, LabelstreamError
from pipeline.results import Row, new_run_id
from pipeline.run.budget import Budget, check_before_start
from pipeline.run.dedupe import Dedupe
from pipeline.run.options import RunOptions, resume_after
from pipeline.run.prepare import Prepared, RowGate, prepare_run
from pipeline.run.summary import Summary
from pipeline.sinks import Sink
from pipeline.sinks.progress_file import RunState, end_state, write_progress
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import Prompt


class Engine(Protocol):
    """How requests travel. `Run` calls `check` before touching the sink, then `execute` once."""

    name: str  # as --engine spells it; also the summary's and the progress file's `engine`
    tier: str  # the price tier of its requests ("standard", "flex", "batch"): what --max-cost counts
    after_stop: str  # what an interrupted run adds before "resume with", e.g. that batches keep running

    def check(self, opts: RunOptions) -> None:
        """Refuse options this engine cannot honour (and resolve credentials), before the sink is touched."""

    async def execute(self, run: Run) -> None:
        """Send the rows `run.gate()` lets through and put every result into `run.sink` (or its dead letters).
        Return when done or once `run.stopping` is set; raise a LabelstreamError to fail the run."""

    def stop(self, run: Run, signals: int) -> bool:
        """The `signals`-th Ctrl-C/SIGTERM (the run has set `stopping` on the first); False: cancel everything."""

    def progress(self) -> dict[str, Any]:
        """The engine's own fields of the progress file."""

    def summary(self) -> dict[str, Any]:
        """The engine's own fields of the summary (keyword arguments of `Summary.of`)."""


class Run:
    """The state of one run that every engine shares: options, sink, stats, budget, stop requests."""

    def __init__(self, opts: RunOptions, engine: Engine, *, notice: IO[str] | None = None) -> None:
        # Only these engines make copies: any other sends every row, and --max-cost prices them all.
        copies = engine.name in ("online", "batch", "ray")
        self.opts = opts if copies or not opts.dedupe else dataclasses.replace(opts, dedupe=False)
        self.engine = engine
        self.notice = notice or sys.stderr
        self.stats = RunStats(
            calls=CallStats(), model=opts.model, tier="flex" if opts.service_tier == "flex" else "standard"
        )
        self.run_id = new_run_id()  # marks this run's dead letters and progress file
        self.prompt = Prompt(opts.config)
        self.stopping = asyncio.Event()  # set by the first signal, or by an engine that stops early
        self.phase = RunState.RUNNING  # what the progress file says while not stopping ("waiting" for batches)
        self.signals = 0
        self.hard_stop = False
        self.budget: Budget | None = None  # --max-cost
        self._prepared: Prepared | None = None
        # Progress is written from threads (the ticker's, the batch engine's); the run's last word must stay last.
        self._progress_lock = threading.Lock()
        self._progress_ended = False

    @property
    def prepared(self) -> Prepared:
        """The prepared sink and input (set before `Engine.execute`)."""
        assert self._prepared is not None  # noqa: S101 - engines run only after preparation
        return self._prepared

    @property
    def sink(self) -> Sink:
        """The run's sink."""
        return self.prepared.sink

    def say(self, text: str) -> None:
        """A note on stderr (not with --quiet)."""
        if self.opts.progress != "off":
            print(f"labelstream: {text}", file=self.notice, flush=True)

    async def gate(self, *, budget: bool = False, dedupe: bool = False) -> RowGate:
        """The row gate over this run's input: done ids, repeats, problems, shards, --limit. With `budget`, a row
        passes only if --max-cost holds its worst case (engines that cannot settle a request before the next one
        leaves, like batch and Ray, pay at most that for every row they send). With `dedupe` (an engine that
        makes copies: Verdict.COPY) and --no-dedupe not given, repeated texts are sent once (run/dedupe.py)."""
        admit = self._admit if budget and self.budget is not None else None
        prepared = self.prepared
        copies = await self.plan_dedupe() if dedupe and self.opts.dedupe else None
        return RowGate(prepared.done, self.stats, self.opts.max_rows, redo=prepared.redo, dropped=prepared.dropped,
                       shard=self.opts.shard, admit=admit, dedupe=copies)  # fmt: skip

    async def plan_dedupe(self) -> Dedupe:
        """The dedupe pass over the input and the sink, in a thread: the loop keeps serving signals and the
        progress file meanwhile, and a Ctrl-C ends the pass at once (the run then sends nothing)."""
        return await asyncio.to_thread(self.prepared.plan_dedupe, self.opts, self.stopping.is_set)

    def _admit(self, row: Row) -> bool:
        assert self.budget is not None  # noqa: S101 - only given with a budget
        return self.budget.reserve(row.text) is not None

    async def execute(self) -> Summary:
        """Run the engine to the end (or to a signal) and return the summary; raise the error that stopped it."""
        opts, engine = self.opts, self.engine
        engine.check(opts)
        self._prepared = prepared = prepare_run(opts)
        try:
            for note in prepared.notes:
                self.say(note)
            price = check_before_start(opts, prepared, self.notice, tier=engine.tier)
            if price is not None and opts.max_cost is not None:
                tokens = TokenEstimator(opts.model, self.prompt.prefix)
                self.budget = Budget(opts.max_cost, price, tokens.prompt_tokens, opts.config.max_tokens,
                                     self.stats.calls, tier=engine.tier)  # fmt: skip
            error = await self._drive()
            return self._finish(error)
        finally:
            review = self.opts.review_below is not None
            await prepared.finish(then=(lambda: note_review(self.opts, self.notice)) if review else None)

    async def _drive(self) -> LabelstreamError | None:
        """The engine's part, under this run's signal handlers and progress file; the error that ended it."""
        main = asyncio.current_task()
        assert main is not None  # noqa: S101 - a run is always awaited inside a task
        loop = asyncio.get_running_loop()
        handled = _install_signals(loop, lambda: self.on_signal(main))
        await asyncio.to_thread(self.write_progress, RunState.RUNNING)  # before any request: siblings see it at once
        ticker = asyncio.create_task(self._keep_progress())
        error: LabelstreamError | None = None
        try:
            try:
                await self.engine.execute(self)
            except LabelstreamError as exc:
                error = exc
        except asyncio.CancelledError:
            if not self.hard_stop:
                raise
            main.uncancel()
        finally:
            _remove_signals(loop, handled)
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        return error

    def _finish(self, error: LabelstreamError | None) -> Summary:
        """The run's state, its last progress file and its summary; raise what ended it (printed once, by the
        catcher)."""
        opts = self.opts
        interrupted = self.stopping.is_set() or self.hard_stop
        over = self.budget is not None and self.budget.stopped
        state = end_state(failed=error is not None, over_budget=over, interrupted=interrupted)
        resume = resume_after(opts.resume_command, error)
        summary = Summary.of(
            self.stats,
            opts=opts,
            state=state,
            error=error,
            dead_letters=str(self.sink.meta.dead_letters_path),
            resume=resume,
            **{"engine": self.engine.name, **self.engine.summary()},
        )
        self.write_progress(state, summary=summary.as_dict(), last=True)
        if error is not None:
            print(summary.render(with_error=False), file=self.notice)
            raise error
        if over and self.budget is not None:
            print(summary.render(), file=self.notice)
            raise self.budget.error(resume)
        if interrupted:
            print(summary.render(), file=self.notice)
            raise Interrupted(f"interrupted; {self.engine.after_stop}resume with: {resume}")
        return summary

    async def _keep_progress(self) -> None:
        """Refresh the progress file about once a second while the engine works."""
        while True:
            await asyncio.sleep(self.opts.progress_every)
            await asyncio.to_thread(self.write_progress, RunState.STOPPING if self.stopping.is_set() else self.phase)

    def write_progress(self, state: RunState, *, last: bool = False, **extra: Any) -> None:
        """Replace the progress file (never fatal: progress is a convenience, the sink is the record).

        After the `last` write (how the run ended) nothing replaces it: cancelling the ticker does not stop a
        write its thread had begun, and that one, landing after "done", left a finished shard saying "running".
        """
        if self.opts.shard is not None:
            extra.setdefault("shard", self.opts.shard.label)
        with self._progress_lock:
            if self._progress_ended:
                return
            self._progress_ended = last
            fields = {"engine": self.engine.name, **self.engine.progress(), **extra}
            write_progress(
                self.sink.meta,
                self.stats.snapshot(
                    state, input=str(self.opts.input), output=str(self.opts.output), run=self.run_id, **fields
                ),
            )

    def on_signal(self, main: asyncio.Task[Any]) -> None:
        """Ctrl-C/SIGTERM: the first stops sending (the engine says how in-flight work ends), later ones go as
        far as the engine allows, then everything is cancelled (the sink stays readable)."""
        self.signals += 1
        if self.signals == 1:
            self.stopping.set()
        if self.engine.stop(self, self.signals):
            if self.signals == 1:
                self.write_progress(RunState.STOPPING)
            return
        self.hard_stop = True
        main.cancel()


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
