"""Rate limits a run learned, kept in the sink's side folder (`limits.json`) so that a resumed run starts at them.

One record per sink (or shard): the endpoint and model it was learned against, when, and what: limits the
provider announced (`rpm`, `tpm`, per minute for the whole key) and the request rate its 429s taught (`rate`,
requests/s for the whole key, and the `window` its lockouts showed). The limiter gives and takes the key's
figures; this process's share of them (`--rate-share`) is applied there, so a run with another share reads the
same record right. A record from another endpoint or model, or older than `FRESH_SECONDS`, is ignored.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson

from pipeline.errors import LabelstreamError

FRESH_SECONDS: Final = 86_400.0  # limits change (a new tier, another key): a day-old record is a guess, not a fact
_FIGURES: Final = ("rpm", "tpm", "rate", "window")

Write = Callable[[Path, Mapping[str, Any]], None]
Read = Callable[[Path], bytes]
WallClock = Callable[[], float]


def endpoint_name(url: str) -> str:
    """The endpoint as the record names it: scheme, host, port and path, never a user, password or query (which
    may carry a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class LimitMemory:
    """Reads and writes one sink's learned limits for one endpoint and model (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        write: Write,
        *,
        endpoint: str,
        model: str,
        read: Read = Path.read_bytes,
        clock: WallClock = time.time,
    ) -> None:
        self.path = path
        self._write = write
        self._read = read  # the sink's own reader: a file on disk, an object on a bucket
        self.endpoint = endpoint
        self.model = model
        self._clock = clock

    def recall(self) -> dict[str, float]:
        """The figures remembered for this endpoint and model, if fresh; empty otherwise (or when unreadable)."""
        try:
            raw = orjson.loads(self._read(self.path))
        except (LabelstreamError, OSError, orjson.JSONDecodeError):
            return {}
        if not isinstance(raw, dict) or raw.get("endpoint") != self.endpoint or raw.get("model") != self.model:
            return {}
        saved = raw.get("saved_at")
        if not isinstance(saved, int | float) or not 0 <= self._clock() - saved <= FRESH_SECONDS:
            return {}
        return {
            name: float(value)
            for name in _FIGURES
            if isinstance(value := raw.get(name), int | float) and not isinstance(value, bool)
            if math.isfinite(value) and value > 0
        }

    def keep(self, figures: Mapping[str, float | None]) -> None:
        """Remember `figures` (None: not learned) for this endpoint and model; never fatal (it is a hint)."""
        record: dict[str, Any] = {"endpoint": self.endpoint, "model": self.model, "saved_at": round(self._clock(), 3)}
        record.update({name: round(value, 4) for name, value in figures.items() if value})
        with contextlib.suppress(LabelstreamError, OSError):
            self._write(self.path, record)
