"""`--procs N`: N shard processes on one machine under one parent, with one progress display and one summary.

`--limit` and `--max-cost` are the whole run's: each child gets its part of them (see budget.split_budget).

Each child is an ordinary `labelstream label ... --shard k/N` process, so everything a shard guarantees
(its own lock, resume, kill -9 safety) holds unchanged; the parent only starts them, shows their
progress files as one, forwards Ctrl-C/SIGTERM, and ends with the worst child's exit code.

The children run in process groups of their own: a Ctrl-C on the terminal reaches the parent alone, which
passes it on exactly once (a second one would tell the children to stop at once). On Linux a child also
gets SIGTERM if the parent dies, so none is left running unsupervised.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import IO, Any

from pipeline.errors import ExitCode, UsageError
from pipeline.input.shards import Shard
from pipeline.run.budget import split_budget
from pipeline.run.options import RunOptions
from pipeline.run.progress import Reporter
from pipeline.run.summary import Summary, combine
from pipeline.sinks import SinkMeta, check_layout, discover, meta_dir_for
from pipeline.sinks.layout import move_aside
from pipeline.sinks.progress_file import read_progress
from pipeline.stats import CallStats, RunStats

ChildArgs = Callable[[Shard, int | None], list[str]]  # the `label` arguments of shard k (and its --limit)
# Worse to the right; anything else (a bug, a death by signal) is worse than all. A shard stopped at its part
# of --max-cost is worse than an interrupted one (resuming needs a higher cap, not just the same command),
# and better than one that could not run at all.
_EXIT_RANK = (
    ExitCode.OK,
    ExitCode.DEAD_LETTERS,
    ExitCode.INTERRUPTED,
    ExitCode.BUDGET,
    ExitCode.USAGE,
    ExitCode.STORAGE,
)
_TAIL_LINES = 200


@dataclass
class _Child:
    shard: Shard
    proc: subprocess.Popen[str]
    progress_path: Any
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    reader: threading.Thread | None = None

    def progress(self) -> dict[str, Any] | None:
        """This child's progress file, if this child wrote it (not a run before it)."""
        doc = read_progress(self.progress_path)
        return doc if doc is not None and doc.get("pid") == self.proc.pid else None


def worst_exit(codes: Sequence[int]) -> int:
    """The exit code of the worst child: a bug or a death by signal, then storage, usage, budget, interrupted,
    dead letters, OK (a child killed by signal s counts as 128 + s, as a shell reports it)."""
    normal = [128 - c if c < 0 else c for c in codes]
    rank = {int(code): i for i, code in enumerate(_EXIT_RANK)}
    return max(normal, key=lambda c: rank.get(c, len(rank)), default=ExitCode.OK)


def split_limit(limit: int | None, count: int) -> list[int | None]:
    """--limit L over N shards: L // N each, the first L % N one more (at most L rows in all)."""
    if limit is None:
        return [None] * count
    return [limit // count + (k < limit % count) for k in range(count)]


def shard_options(opts: RunOptions, count: int) -> list[RunOptions]:
    """The options of each child of `--procs N` as it runs: its shard, its part of --limit, its share of the key
    (--rate-share, else 1/N). A shard left no row by a small --limit is not started, so not listed."""
    share = opts.limits.share if opts.limits.share != 1.0 else 1 / count
    limits = replace(opts.limits, share=share)
    return [
        replace(opts, shard=Shard(k, count), max_rows=rows, limits=limits, restart=False)
        for k, rows in enumerate(split_limit(opts.max_rows, count))
        if rows != 0
    ]


def prepare_output(opts: RunOptions, count: int) -> list[str]:
    """Make the output ready for N shards: moved aside for --skip_labeled False, then checked; return notes."""
    notes = []
    if opts.restart:
        held = [SinkMeta(opts.output, s) for s in discover(opts.output).shards]
        if meta_dir_for(opts.output).is_dir():
            held.append(SinkMeta(opts.output))
        try:
            for meta in held:
                meta.lock()  # never move an output from under a run that still writes it
            backup = move_aside(opts.output)
        finally:
            for meta in held:
                meta.unlock()
        if backup is not None:
            notes.append(f"moved the previous output to {backup} (--skip_labeled False)")
    check_layout(opts.output, Shard(0, count))
    return notes


def run_procs(
    opts: RunOptions, count: int, child_args: ChildArgs, *, notice: IO[str] | None = None
) -> tuple[Summary | None, int]:
    """Run shards 0 … N-1 as child processes; return their combined summary (None if none ran) and exit code."""
    if count < 2:
        raise UsageError("--procs N runs N shard processes; give N ≥ 2 (or leave it out for one process).")
    notice = notice or sys.stderr
    for note in prepare_output(opts, count):
        if opts.progress != "off":
            print(f"labelstream: {note}", file=notice)
    started = time.monotonic()
    processes = shard_options(opts, count)
    children = _start(processes, split_budget(opts.max_cost, processes, notice), child_args)
    stats = RunStats(calls=CallStats(), model=opts.model, started=started)
    docs: dict[int, dict[str, Any]] = {}
    reporter = Reporter(stats, mode=opts.progress, stream=notice, concurrency=lambda: _in_flight(docs))
    previous = _forward_signals(children, opts, notice)
    try:
        while any(child.proc.poll() is None for child in children):
            _absorb(stats, children, docs)
            reporter.update()
            _wait_a_little(children, opts.progress_every)
    finally:
        _restore_signals(previous)
        for child in children:
            if child.reader is not None:
                child.reader.join(timeout=10)
        _absorb(stats, children, docs)
        reporter.close()
    codes = [child.proc.returncode for child in children]
    _report_failures(children, notice)
    if ExitCode.BUDGET in codes:  # the children's own messages name their part of the cap, not the run's
        print(
            f"labelstream: stopped before passing --max-cost ${opts.max_cost:g} (each of the {len(children)} shards "
            "at its part); finished rows are saved: raise --max-cost and re-run the same command to resume.",
            file=notice,
        )
    parts = [Summary.from_dict(doc["summary"]) for doc in docs.values() if isinstance(doc.get("summary"), dict)]
    if not parts:
        return None, worst_exit(codes)
    summary = combine(
        parts,
        output=str(opts.output),
        dead_letters=str(meta_dir_for(opts.output) / "shard-*" / "dead_letters.jsonl"),
        resume=opts.resume_command,
        elapsed_s=time.monotonic() - started,
        max_cost=opts.max_cost,
    )
    return summary, worst_exit(codes)


def _start(processes: list[RunOptions], costs: list[float | None], child_args: ChildArgs) -> list[_Child]:
    """Start one child per shard, each with its part of --limit and of --max-cost."""
    preexec = _die_with_parent()
    children = []
    for process, cost in zip(processes, costs, strict=True):
        assert process.shard is not None  # noqa: S101 - shard_options gives every process its shard
        budget = [] if cost is None else ["--max-cost", repr(cost)]
        proc = subprocess.Popen(  # noqa: S603 - our own CLI; the arguments are the user's parsed flags
            [sys.executable, "-m", "pipeline", *child_args(process.shard, process.max_rows), *budget],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=preexec,  # noqa: PLW1509 - async-signal-safe: one prctl call, no threads started yet
        )
        children.append(_Child(process.shard, proc, SinkMeta(process.output, process.shard).progress_path))
    for child in children:  # readers start only once every child is forked (see preexec_fn)
        child.reader = threading.Thread(target=_drain, args=(child,), daemon=True)
        child.reader.start()
    return children


def _drain(child: _Child) -> None:
    """Keep reading a child's stderr (a full pipe would stall it); keep the last lines for the report."""
    assert child.proc.stderr is not None  # noqa: S101 - started with stderr=PIPE
    for line in child.proc.stderr:
        child.tail.append(line.rstrip("\n"))


def _wait_a_little(children: list[_Child], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for child in children:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=left)


def _absorb(stats: RunStats, children: list[_Child], docs: dict[int, dict[str, Any]]) -> None:
    """The children's progress files, added up into the parent's counters."""
    for k, child in enumerate(children):
        if (doc := child.progress()) is not None:
            docs[k] = doc

    def total(key: str) -> int:
        return sum(int(doc.get(key) or 0) for doc in docs.values())

    stats.labeled, stats.failed, stats.read = total("labeled"), total("failed"), total("read")
    stats.calls.retries, stats.calls.rate_limited = total("retries"), total("rate_limited")
    stats.calls.timeouts = total("timeouts")
    stats.calls.prompt_tokens, stats.calls.completion_tokens = total("prompt_tokens"), total("completion_tokens")
    expected = [doc.get("expected") for doc in docs.values()]
    known = len(docs) == len(children) and all(isinstance(e, int) for e in expected)
    stats.expected = sum(e for e in expected if isinstance(e, int)) if known else None
    stats.expected_exact = known and all(doc.get("expected_exact") for doc in docs.values())


def _in_flight(docs: dict[int, dict[str, Any]]) -> tuple[int, int]:
    return sum(int(d.get("in_flight") or 0) for d in docs.values()), sum(
        int(d.get("window") or 0) for d in docs.values()
    )


def _forward_signals(children: list[_Child], opts: RunOptions, notice: IO[str]) -> dict[int, Any]:
    """Pass Ctrl-C and SIGTERM on to every child still running; return the handlers they replace."""
    received = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        if received == 1:
            print(
                f"\nlabelstream: stopping {len(children)} shard processes: in-flight requests get up to "
                f"{opts.grace_seconds:g} s, then each saves. Press Ctrl-C again to stop at once.",
                file=notice,
                flush=True,
            )
        for child in children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _report_failures(children: list[_Child], notice: IO[str]) -> None:
    """The errors of children that failed (once per distinct message, naming the shards)."""
    seen: dict[str, list[str]] = {}
    for child in children:
        code = child.proc.returncode
        if code in (ExitCode.OK, ExitCode.DEAD_LETTERS, ExitCode.INTERRUPTED, ExitCode.BUDGET):
            continue  # their counts (and why they stopped) are in the summary
        errors = [line for line in child.tail if line.startswith("labelstream: error:")]
        for line in errors or list(child.tail)[-20:] or [f"exited with code {code}"]:
            seen.setdefault(line, []).append(child.shard.label)
    for line, shards in seen.items():
        print(f"[shard {', '.join(shards)}] {line}", file=notice)


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has the kernel send the child SIGTERM when the parent dies (Linux only)."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook
