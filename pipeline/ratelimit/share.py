"""The rate share a shard takes while its siblings run, from their progress files.

Shards on one key each pace at their share of its limits (1/N by default). When a shard finishes, stops or
dies, its part would go unused and the last shards would run alone at a quarter of the limit. So each shard
reads its siblings' progress files (they sit beside its own under `OUT.meta/`, on whatever storage the
output is on) every few seconds, and takes the part of every sibling that is no longer running:
`share × N ÷ running shards`, never more than the whole key. No coordinator: the files the shards write anyway
are the shared state. Together the shards take N × share, except for a sibling that comes back: until each
other shard reads its file again (within a look with up to 17 shards; a look reads 16 files in turn, so with
1,000 shards within about three minutes) it holds its own part beside what the others took over.

A sibling with no progress file yet counts as running (it may be starting, or queued by the scheduler, and
will want its part); so does every sibling during the first seconds of a run, when siblings started with
it have not written their first progress yet. A sibling whose file says running is gone only once this
shard has seen its `updated_at` stay the same for `SILENT_AFTER` seconds of this shard's own clock: clocks
of other machines, and how long ago this shard last read the file, do not enter into it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

from pipeline.input.shards import Shard
from pipeline.sinks.meta import SinkMeta
from pipeline.sinks.progress_file import LIVE, read_progress

# A sibling whose progress has not changed for this long (by this shard's clock) no longer holds its part.
SILENT_AFTER: Final = 20.0
START_GRACE: Final = 10.0  # seconds before a shard believes a sibling's "not running"
REFRESH: Final = 3.0  # seconds between looks at the siblings' progress files
# Progress files read per look, in turn: with a thousand shards on NFS, each reading every sibling every few
# seconds would be a million small reads a minute. A sibling's state is then at most N/16 looks old.
READS_PER_LOOK: Final = 16


class ShareFollower:
    """This shard's share of the key: its given `share` while all N shards run, more as siblings end."""

    def __init__(self, output: Path, shard: Shard, share: float, *, clock: Any = time.monotonic) -> None:
        self.shard = shard
        self.share = share
        self.base = share
        self._clock = clock
        self._next = clock() + START_GRACE
        self._siblings = [SinkMeta(output, Shard(i, shard.count)).progress_path for i in range(shard.count)]
        del self._siblings[shard.index]
        # Per sibling: its last progress document (None: no file yet), when this shard first read that version,
        # and when it last read it. Silent = read unchanged across SILENT_AFTER, not merely read long ago.
        self._seen: list[tuple[dict[str, Any], float, float] | None] = [None] * len(self._siblings)
        self._cursor = 0

    def look(self) -> None:
        """Read the next `READS_PER_LOOK` siblings' progress files."""
        now = self._clock()
        for _ in range(min(READS_PER_LOOK, len(self._siblings))):
            i = self._cursor
            self._cursor = (i + 1) % len(self._siblings)
            doc = read_progress(self._siblings[i])
            before = self._seen[i]
            if doc is None:
                if before is None or not self._siblings[i].exists():
                    self._seen[i] = None
                continue  # unreadable for a moment (another writer's rename): keep what was known
            same = before is not None and before[0].get("updated_at") == doc.get("updated_at")
            self._seen[i] = (doc, before[1] if same and before is not None else now, now)

    def running(self) -> int:
        """How many of the N shards run (this one included), from the files last read: all but those that ended
        or stopped, and those whose progress was read unchanged across `SILENT_AFTER` seconds."""
        gone = 0
        for seen in self._seen:
            if seen is None:
                continue  # no progress file: not started yet, and it will want its part
            doc, since, checked = seen
            if str(doc.get("state")) not in LIVE or checked - since >= SILENT_AFTER:
                gone += 1
        return self.shard.count - gone

    def refresh(self) -> float | None:
        """Look at the siblings if it is time; return the new share when it changed, else None."""
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + REFRESH
        self.look()
        share = min(1.0, self.base * self.shard.count / max(1, self.running()))
        if abs(share - self.share) < 1e-9:
            return None
        self.share = share
        return share
