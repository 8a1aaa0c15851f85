"""The progress file (`OUT.meta/progress.json`, one per shard): the one module that writes and reads it.

A run replaces it about once a second (atomically, so a reader sees the old document or the new one). It is
read by the `--procs` parent (one display, one summary), by sibling shards (who still runs: their rate share),
by `status` (is the run alive), by `compact` (have all shards finished) and by the next run's estimate (the
token scale learned). It is a convenience, never the record: writing it is never fatal, and a reader gets
None for a file that is missing, torn, garbled or not an object, and goes on.

Schema 1 added the `schema` field; files written before it (no `schema`) have the same fields and read the same.
The state strings are the ones written since the first version, so old files keep their meaning.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.errors import LabelstreamError, StorageError
from pipeline.sinks.meta import SinkMeta, pid_alive
from pipeline.sinks.storage import object_uri, read_location

SCHEMA: Final = 1
STALE_AFTER: Final = 60.0  # seconds without a progress update (written about once a second) before "stale"


class RunState(StrEnum):
    """Where a run is, as its progress file says (and `status` shows)."""

    RUNNING = "running"
    STOPPING = "stopping"  # a signal came: in-flight requests get their grace period, then it saves
    WAITING = "waiting"  # batch engine: every row sent, waiting for the provider's batches
    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"  # stopped by an error (its message is in the summary)
    BUDGET = "budget"  # stopped before passing --max-cost
    STALE = "stale"  # read side only: the file says running, but nobody has updated it for a while
    NOT_STARTED = "not started"  # read side only: no side files at all


_STALE: Final = RunState.STALE.value
LIVE: Final = frozenset({RunState.RUNNING, RunState.STOPPING})
# Worse to the right: the state of a run of several shards is its worst shard's.
_SEVERITY: Final = (RunState.DONE, RunState.INTERRUPTED, RunState.BUDGET, RunState.FAILED)


def worst_state(states: list[str]) -> str:
    """The state of a run made of shards in these states (an unknown state counts as failed)."""
    rank = {state.value: i for i, state in enumerate(_SEVERITY)}
    return max(states, key=lambda s: rank.get(s, rank[RunState.FAILED]))


def end_state(*, failed: bool, over_budget: bool = False, interrupted: bool = False) -> RunState:
    """How a run ended: an error first, then the budget, then a signal."""
    if failed:
        return RunState.FAILED
    if over_budget:
        return RunState.BUDGET
    return RunState.INTERRUPTED if interrupted else RunState.DONE


def write_progress(meta: SinkMeta, document: Mapping[str, Any]) -> None:
    """Replace the progress file with `document` (a `RunStats.snapshot`), stamped with the schema and the host.

    Never fatal: progress is a convenience, the sink is the record.
    """
    stamped = {"schema": SCHEMA, "host": socket.gethostname(), **document}
    with contextlib.suppress(LabelstreamError):
        meta.write_json_atomic(meta.progress_path, stamped)


def read_progress(path: Path) -> dict[str, Any] | None:
    """A progress file's document, or None when it is missing, unreadable, torn or not a JSON object.

    `path` may name an object (an output on s3://): then it is read from the store, and a store that does not
    answer for a moment counts as unreadable.
    """
    try:
        doc = orjson.loads(read_location(path))
    except (OSError, StorageError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def last_state(meta: SinkMeta) -> str:
    """What the last run of this sink (or shard) wrote as its state, or why there is none."""
    if object_uri(meta.dir) is None and not meta.dir.is_dir():  # a bucket has no folders: its progress object says
        return RunState.NOT_STARTED.value
    doc = read_progress(meta.progress_path)
    return "no progress file" if doc is None else str(doc.get("state"))


def run_state(progress: Mapping[str, Any] | None, now: datetime) -> str:
    """A run's state from its progress file: a "running" file nobody updates any more is stale.

    A plain string (a `RunState` value, or a state a newer version wrote): callers use it as a JSON key.
    """
    if progress is None:
        return _STALE  # side files but no progress yet: started, then stopped before its first update
    state = str(progress.get("state"))
    if state not in LIVE and state != RunState.WAITING:  # a waiting batch run sends nothing, but is alive too
        return state
    pid, host = progress.get("pid"), progress.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        return _STALE
    try:
        updated = datetime.fromisoformat(str(progress.get("updated_at")).replace("Z", "+00:00"))
    except ValueError:
        return _STALE
    if (now - updated).total_seconds() > STALE_AFTER:
        return _STALE
    return state if state == RunState.WAITING else RunState.RUNNING.value
