"""How many rows a run will finish, before the reader has seen them all: the progress total and its ETA."""

from __future__ import annotations

from pipeline.run.prepare import RowGate


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
