"""How many rows a run will finish, before the reader has seen them all: the progress total and its ETA."""

from __future__ import annotations

import threading
from pathlib import Path

from pipeline.run.prepare import RowGate


def count_lines(path: Path, stop: threading.Event | None = None) -> int:
    """Newlines in the file (plus one for an unterminated last line): the base of the row-count estimate.

    Checks `stop` between 1 MiB chunks, so a run that is done or stopping does not wait for a huge file.
    """
    lines = 0
    chunk = b""
    with path.open("rb") as handle:
        while not (stop is not None and stop.is_set()) and (chunk := handle.read(1 << 20)):
            lines += chunk.count(b"\n")
        if handle.tell() and chunk[-1:] != b"\n":
            lines += 1
    return lines


def estimate_expected(gate: RowGate, read: int, lines: int | None, lines_read: int) -> int | None:
    """Rows this run will finish: what the gate let through so far, plus the same share of the rows still
    unread (rows ≈ lines × records per line read so far). None until the input's lines are counted."""
    if lines is None or read == 0:
        return None
    total = lines * read / max(1, lines_read)
    estimate = gate.admitted + max(0.0, total - read) * gate.admitted / read
    if gate.max_rows is not None:
        estimate = min(estimate, gate.max_rows + gate.problems)
    return max(gate.admitted, round(estimate))
