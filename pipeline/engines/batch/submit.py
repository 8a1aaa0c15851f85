"""Getting rows to the provider: request files for the rows no one has done or holds, then, for each file,
upload → record → create → record, picking a submission up wherever a crash left it.

The one step a record cannot cover is the create itself: a crash after the provider made the batch and
before its id was written. The create therefore carries the submission id in the batch's metadata, and a
submission found in `creating` is looked up by it (`find_batch`) before anything is created again.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Final

from openai.types import Batch

from pipeline.engines.batch.api import BatchApi, Uncertain
from pipeline.engines.batch.files import RequestFiles, Written, request_sha
from pipeline.engines.batch.ledger import (
    CREATING,
    PREPARED,
    SUBMISSION_KEY,
    SUBMITTED,
    UPLOADED,
    Ledger,
    Submission,
)
from pipeline.errors import BatchError
from pipeline.input.ids import IdSet
from pipeline.results import Failed, Labeled, Row
from pipeline.run.copies import copy_of_known
from pipeline.run.prepare import RowGate, Verdict
from pipeline.stats import RunStats

# How far back (seconds) to look for a batch before the moment its create was sent: clocks differ.
_CLOCK_SLACK: Final = 3600
# A create sent this recently may not be listed yet: wait until it is this old before concluding it never landed.
SETTLE_SECONDS: Final = 5.0
_CREATE_ATTEMPTS: Final = 6
# Copies (dedupe) the planner holds before it hands them over, so an input of repeats never sits in memory.
_COPIES_AT_ONCE: Final = 5000


class Planner:
    """Reads the input through the RowGate and writes request files, one file per `next_file` call.

    Rows already in the sink or in a live batch are skipped, and so are rows whose very request a server refused
    as sent before (`refused`: id → request fingerprint); problem rows become dead letters without a request.
    With dedupe, a row whose text the sink holds becomes a copy of that record (`copies`, for the caller to write);
    one whose text this run already put in a request is `deferred`: it copies the original once its batch is
    collected (`copy_pass` in engine.py, or the next run).
    Blocking (CSV and file I/O): call it from a thread.
    """

    def __init__(
        self,
        rows: Iterator[Row],
        gate: RowGate,
        live: IdSet,
        stats: RunStats,
        files: RequestFiles,
        *,
        refused: dict[str, str] | None = None,
    ) -> None:
        self.rows, self.gate, self.live, self.stats, self.files = rows, gate, live, stats, files
        self.refused = refused or {}
        self.problems: list[Failed] = []  # handed to the dead letters by the caller
        self.copies: list[Labeled] = []  # handed to the sink by the caller (their originals are in it)
        self.deferred = 0  # rows whose original is in a request of this run: copied once it is collected
        self.paused = False  # next_file returned None to hand over `copies`, not because planning ended

    @classmethod
    def over(
        cls,
        batches: Iterator[list[Row]],
        gate: RowGate,
        live: IdSet,
        stats: RunStats,
        files: RequestFiles,
        *,
        refused: dict[str, str] | None = None,
    ) -> Planner:
        """A planner over a source's row batches."""
        return cls(itertools.chain.from_iterable(batches), gate, live, stats, files, refused=refused)

    def next_file(self, stop: threading.Event) -> Written | None:
        """The next complete request file; the last, partial one once the input or --limit ends; None after (or,
        with `paused` set, when `copies` are due to be written: call again after)."""
        gate, stats = self.gate, self.stats
        self.paused = False
        while not stop.is_set() and not gate.full:
            if len(self.copies) >= _COPIES_AT_ONCE:
                self.paused = True
                return None
            row = next(self.rows, None)
            if row is None:
                break
            if row.id in self.live and row.id not in gate.done:
                stats.read += 1
                stats.in_batches += 1
                continue
            if row.id in self.refused and row.id not in gate.done and self._refused_before(row):
                stats.read += 1
                stats.refused_before += 1
                continue
            verdict = gate.classify(row)
            if verdict is Verdict.PROBLEM:
                self.problems.append(gate.failure(row))
            elif verdict is Verdict.SEND and (written := self.files.add(row)) is not None:
                return written
            elif verdict is Verdict.COPY:
                self._copy(row)
        if stop.is_set():
            self.files.discard()  # a stop leaves no half-planned file: its rows go in the next run
            return None
        return self.files.finish()

    def _copy(self, row: Row) -> None:
        assert self.gate.dedupe is not None  # noqa: S101 - only a gate with dedupe sorts copies
        # Known originals are the sink's: this engine learns none while planning, so the rest wait for the batches.
        if (copy := copy_of_known(self.gate.dedupe, row)) is None:
            self.deferred += 1
        else:
            self.copies.append(copy)

    def _refused_before(self, row: Row) -> bool:
        """Whether this row would send the very request a server refused (its text, model and task unchanged)."""
        return request_sha(self.files.prompt, row, self.files.model) == self.refused[row.id]


async def submit(api: BatchApi, ledger: Ledger, sub: Submission, *, settle: float = SETTLE_SECONDS) -> Batch:
    """Take a submission from where it stands to `submitted`; every step is recorded before the next starts."""
    if sub.state == PREPARED:
        file_id = await api.upload(ledger.requests_path(sub.id), f"labelstream-{sub.id}.jsonl")
        ledger.record(sub, state=UPLOADED, input_file_id=file_id, endpoint=api.where)
    if sub.state == CREATING:
        found = await find_batch(api, sub, settle=settle)
        if found is not None:
            return _submitted(ledger, sub, found)
        ledger.record(sub, state=UPLOADED)  # it never reached the provider: create it now
    if sub.state != UPLOADED or sub.input_file_id is None:
        raise BatchError(f"submission {sub.id} is {sub.state}; nothing to submit")
    metadata = {SUBMISSION_KEY: sub.id, "labelstream_rows": str(sub.requests)}
    for attempt in itertools.count(1):
        ledger.record(sub, state=CREATING, create_sent_at=int(time.time()))
        try:
            batch = await api.create(sub.input_file_id, metadata)
        except Uncertain as exc:
            # It may exist: look before creating again, or a row could go to the provider twice.
            found = await find_batch(api, sub, settle=settle)
            if found is not None:
                return _submitted(ledger, sub, found)
            if attempt >= _CREATE_ATTEMPTS:
                # Still `creating`: the next run looks for the batch again before it creates one.
                raise BatchError(
                    f"could not create a batch at {api.where} ({exc}). Nothing is lost: re-run the same command."
                ) from None
            await api.sleep(api.retry.backoff(attempt, api.rng))
            continue
        except BatchError:
            # Refused outright, so surely not created; upload afresh next time (the file may be what was wrong).
            ledger.record(sub, state=PREPARED, input_file_id=None)
            raise
        return _submitted(ledger, sub, batch)
    raise AssertionError("unreachable")  # pragma: no cover


async def find_batch(api: BatchApi, sub: Submission, *, settle: float = SETTLE_SECONDS) -> Batch | None:
    """The batch a create for `sub` made, if it made one: found by the submission id in its metadata."""
    sent = sub.create_sent_at
    for look in range(2):
        async for batch in api.batches():
            if (batch.metadata or {}).get(SUBMISSION_KEY) == sub.id:
                return batch
            if sent is not None and batch.created_at < sent - _CLOCK_SLACK:
                break  # newest first: everything further is older than this create
        # A create sent moments ago may not be listed yet; give it until `settle` seconds old, then look again.
        wait = (sent or 0) + settle - time.time()
        if look or wait <= 0:
            return None
        await api.sleep(wait)
    return None


def _submitted(ledger: Ledger, sub: Submission, batch: Batch) -> Batch:
    ledger.record(sub, state=SUBMITTED, batch_id=batch.id, status=batch.status, counts=counts_of(batch))
    with contextlib.suppress(FileNotFoundError):
        ledger.requests_path(sub.id).unlink()  # the provider has it; the rows file stays until collected
    return batch


def counts_of(batch: Batch) -> dict[str, int]:
    """A batch's request counts as a plain dict ({} when the provider gave none)."""
    counts = batch.request_counts
    if counts is None:
        return {}
    return {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
