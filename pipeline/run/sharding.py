"""Which shard labels a row, and what keeps every id exactly once when that rule changes between runs.

With dedupe on, a row goes to the shard of its text's dedupe key (exact or normalised fingerprint), so that
identical texts always land in one shard and shards running side by side never both send one text. Without
it (--no-dedupe), a row goes to the shard of its id, as before. Problem rows (no usable text) go by id.

The rule can change between runs (--no-dedupe, then dedupe; --dedupe exact, then normalized; an edited text
whose new fingerprint picks another shard), so a row done by one shard may now belong to another. Two things
keep each id once:

- every shard skips the ids done in ANY shard of the output (`all_done`), not only its own;
- shards of one output never run side by side with different rules (`check_shard_key`): each run records its
  rule in its manifest, then refuses to go on while a sibling that holds its lock recorded another one.
"""

from __future__ import annotations

import contextlib
import fcntl
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import SinkMismatchError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard
from pipeline.results import sha_tag
from pipeline.run.options import RunOptions
from pipeline.sinks import Manifest, open_sink
from pipeline.sinks.meta import SinkMeta
from pipeline.sinks.progress_file import LIVE, RunState, read_progress, run_state

BY_ID = "id"  # the rule of --no-dedupe runs, and of runs made before the rule was recorded


def shard_key(opts: RunOptions) -> str:
    """The rule this run shards by: "id", or the dedupe match mode ("exact", "normalized")."""
    return opts.dedupe_match if opts.dedupe else BY_ID


def recorded_key(manifest: Manifest | None) -> str | None:
    """The rule the last run of a shard recorded (None: it never ran)."""
    if manifest is None or not manifest.runs:
        return None
    return str(manifest.runs[-1].get("shard_key") or BY_ID)


def all_done(opts: RunOptions, shard: Shard) -> IdSet:
    """The ids every shard of the output holds, tagged with their text fingerprints (one read of each shard)."""
    sinks = [open_sink(opts.output, Shard(i, shard.count)) for i in range(shard.count)]
    entries = (
        (str(rec["id"]), sha_tag(rec.get("text_sha")))
        for sink in sinks
        for rec in sink.iter_records(["id", "text_sha"])
        if rec.get("id") is not None
    )
    done, _ = IdSet.bulk(entries)
    return done


def _running(meta: SinkMeta) -> bool:
    """Whether a run holds this shard now: its lock is taken (local) or its lease is live (object storage; both are
    taken before the shard's manifest is written), else what its progress file says."""
    if (lease := getattr(meta, "lease", None)) is not None:
        return bool(lease.alive_elsewhere())
    with contextlib.suppress(OSError), Path(meta.dir / "lock").open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    state = run_state(read_progress(meta.progress_path), datetime.now(UTC))
    return state in LIVE or state == RunState.WAITING


def check_shard_key(opts: RunOptions, shard: Shard) -> None:
    """Refuse to run beside a sibling shard that shards by another rule (call after writing this run's manifest,
    so that of two shards starting at once, at least the later sees the other)."""
    mine = shard_key(opts)
    for index in range(shard.count):
        if index == shard.index:
            continue
        meta = open_sink(opts.output, Shard(index, shard.count)).meta
        theirs = recorded_key(meta.read_manifest())
        if theirs is None or theirs == mine or not _running(meta):
            continue
        raise SinkMismatchError(
            f"shard {index}/{shard.count} of {opts.output} is running with rows sharded by {_rule(theirs)}; this "
            f"run shards them by {_rule(mine)}, so a row could go to both. Run every shard of an output with the "
            "same --dedupe / --no-dedupe, or wait until that shard ends (after it, switching is safe)."
        )


def _rule(key: str) -> str:
    return "id (--no-dedupe)" if key == BY_ID else f"text (--dedupe {key})"
