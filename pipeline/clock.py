"""Wall-clock timestamps as written into records and side files."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """UTC time with milliseconds, e.g. 2026-11-27T01:44:37.123Z (the format of `labeled_at`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
