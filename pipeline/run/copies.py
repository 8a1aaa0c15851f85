"""Copies made from the sink, for engines that cannot hand a copy to the writer right behind its original.

Ray (like the Batch API) labels rows far from the run that reads them, so a row repeating a text it sent
waits until the original is in the sink: `copy_from_sink` then reads the input once more and gives each such
row a copy of that record (run/dedupe.py). A crash before it loses nothing: the next run finds the original
in the sink and copies it while planning, without a request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Final

from pipeline.results import Labeled, Row, sha_tag
from pipeline.run.dedupe import Dedupe
from pipeline.run.lifecycle import Run
from pipeline.run.prepare import RowGate, Verdict
from pipeline.stats import CallStats, RunStats

# Rows read (in a thread) per step: the copies of one step are written before the next is read.
_ROWS_AT_ONCE: Final = 5000


def copy_of_known(dedupe: Dedupe, row: Row) -> Labeled | None:
    """`row`'s copy when its original is already in the sink (planned from it), else None: it waits."""
    original = dedupe.known.get(dedupe.key(row))
    return None if original is None else original.copy_for(row)


async def save_copies(run: Run, copies: list[Labeled]) -> None:
    """Write copies whose originals are in the sink, and count them as this run's labeled rows."""
    if not copies:
        return
    await run.sink.append(copies)
    for item in copies:
        run.prepared.done.add(item.row.id, sha_tag(item.row.sha))
    run.stats.copies += len(copies)
    run.stats.labeled += len(copies)
    run.stats.saved += len(copies)


async def copy_from_sink(run: Run) -> int:
    """Once this run's originals are saved, give every row still to do that repeats a text the sink holds a copy
    of its record. Returns how many rows still wait (their original failed): the next run labels them."""
    prepared = run.prepared
    prepared.source.close()  # the first pass read it to the end
    prepared.source.open()
    dedupe = await run.plan_dedupe()
    # A scratch count: the rows were counted when the run first read them.
    gate = RowGate(prepared.done, RunStats(calls=CallStats(), model=run.opts.model), None, shard=run.opts.shard,
                   dedupe=dedupe)  # fmt: skip
    rows: Iterator[Row] = itertools.chain.from_iterable(prepared.source.batches())
    waiting = 0
    while not run.stopping.is_set():
        chunk = await asyncio.to_thread(lambda: list(itertools.islice(rows, _ROWS_AT_ONCE)))
        if not chunk:
            break
        copies = []
        for row in chunk:
            if gate.classify(row) is Verdict.COPY:
                copy = copy_of_known(dedupe, row)
                waiting += copy is None
                copies += [copy] if copy is not None else []
        await save_copies(run, copies)
    return waiting
