"""The lease that keeps two writers off one output on object storage, where `flock` does not exist.

A writer creates `.meta/lease.json` only if it is absent (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`),
so of two that start at once exactly one succeeds. The holder renews it (a rewrite only if it is still the
version it wrote: `If-Match: <etag>`, `ifGenerationMatch=<generation>`) every third of its lifetime on a
thread of its own; a writer that finds a lease refuses to start, naming the holder and when the lease ends. A
lease whose holder crashed is taken over on the same condition (the stale version), so of two takers one wins,
when

- the store's own clock (the `Date` of its reply) is past the object's `Last-Modified` plus its lifetime:
  local clocks never enter the decision, so skew between machines cannot shorten a lease; or
- its holder ran on this host under a pid that no longer exists (a restart after `kill -9` need not wait).

A holder that cannot renew for a whole lifetime stops writing (`check`), since another may have taken over.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Final

import orjson

from pipeline.errors import SinkError, StorageError
from pipeline.sinks.conditional import ObjectInfo
from pipeline.sinks.meta import pid_alive
from pipeline.sinks.storage import ObjectStore

LEASE_NAME: Final = "lease.json"
RELEASE_WAIT: Final = 30.0  # seconds release() waits for a renewal in flight (the store's own timeouts bound it)


class Lease:
    """A writer's claim on one output (or shard), held in the object `key` of `store`."""

    def __init__(self, store: ObjectStore, key: str, what: str) -> None:
        self.store = store
        self.key = key
        self.what = what
        self.seconds = store.lease_seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(6).hex()}
        self._etag: str | None = None
        self._renewed = 0.0  # monotonic time of the last successful write of the lease
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether this process holds the lease now."""
        return self._etag is not None

    def acquire(self) -> list[str]:
        """Take the lease (or take over a dead holder's) and start renewing it; return notes for the user."""
        notes: list[str] = []
        etag = self._put()
        if etag is None:
            stale = self._read()
            if stale is None:  # released between our write and our read: try once more
                etag = self._put()
            elif _holder(stale).get("token") == self.owner["token"]:
                etag = stale.etag  # our own create, retried by the client after its reply was lost
            else:
                reason = self._why_dead(stale)
                if reason is None:
                    raise self._refusal(stale)
                etag = self._put(if_match=stale.etag)
                if etag is not None:
                    notes.append(f"took over the lease on {self.what}: {reason}")
            if etag is None:
                raise SinkError(
                    f"another labelstream run took the lease on {self.what} at the same moment; wait for it to "
                    "finish or stop it first."
                )
        self._etag, self._renewed, self._lost = etag, time.monotonic(), None
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="labelstream-lease", daemon=True)
        self._thread.start()
        return notes

    def alive_elsewhere(self) -> bool:
        """Whether another run holds this lease now (its object is there, and its holder may be alive)."""
        stale = self._read()
        return (
            stale is not None and _holder(stale).get("token") != self.owner["token"] and self._why_dead(stale) is None
        )

    def check(self) -> None:
        """Raise StorageError when the lease may be another's now (call before each write)."""
        if self._etag is None:
            return
        if self._lost is None and time.monotonic() - self._renewed > self.seconds:
            self._lost = f"it could not be renewed for {self.seconds:.0f} s"
        if self._lost is not None:
            raise StorageError(
                f"stopped writing {self.what}: lost its lease ({self._lost}), so another run may write it now. "
                "Parts written before are complete; re-run to resume once the other run ends."
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RELEASE_WAIT)
            self._thread = None
        with self._guard:
            etag, self._etag = self._etag, None
        if etag is None or self._lost is not None:
            return
        self.store.writes().delete(self.key, etag)

    def renew(self) -> None:
        """Rewrite the lease if it is still ours; note it as lost when the store says another holds it."""
        with self._guard:
            if self._etag is None or self._lost is not None:
                return
            try:
                etag = self._put(if_match=self._etag)
            except StorageError:
                return  # the store is unreachable: keep trying until `check` gives up
            if etag is None:
                self._lost = "another run took it over"
            else:
                self._etag, self._renewed = etag, time.monotonic()

    def _keep(self) -> None:
        while not self._stop.wait(max(self.seconds / 3, 0.05)):
            self.renew()

    def _body(self) -> bytes:
        return orjson.dumps({**self.owner, "seconds": self.seconds})

    def _put(self, if_match: str | None = None) -> str | None:
        """Write the lease (only if absent, or only if still version `if_match`); its new version, or None when
        the condition failed."""
        writes, body = self.store.writes(), self._body()
        return writes.create(self.key, body) if if_match is None else writes.replace(self.key, body, if_match)

    def _read(self) -> ObjectInfo | None:
        """The lease object with the store's clock, or None when there is none."""
        return self.store.writes().read(self.key)

    def _why_dead(self, stale: ObjectInfo) -> str | None:
        """Why a lease found in the store no longer counts (None: its holder may be alive)."""
        holder = _holder(stale)
        ends = stale.modified + timedelta(seconds=float(holder.get("seconds", self.seconds)))
        if stale.now > ends:
            return f"{_owner(holder)} did not renew it after {ends:%Y-%m-%d %H:%M:%S} UTC (it crashed or was stopped)"
        pid = holder.get("pid")
        if holder.get("host") == self.owner["host"] and isinstance(pid, int) and not pid_alive(pid):
            return f"{_owner(holder)} is no longer running"
        return None

    def _refusal(self, stale: ObjectInfo) -> SinkError:
        holder = _holder(stale)
        ends = stale.modified + timedelta(seconds=float(holder.get("seconds", self.seconds)))
        return SinkError(
            f"another labelstream run ({_owner(holder)}) is writing {self.what}: it holds the lease until "
            f"{_clock(ends)} UTC and renews it while it runs. Wait for it to finish or stop it first; if it crashed, "
            "re-run after that time."
        )


def _holder(info: ObjectInfo) -> dict[str, Any]:
    try:
        raw = orjson.loads(info.data)
    except orjson.JSONDecodeError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _owner(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _clock(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}"
