"""Process-wide signal handling for the CLI: SIGTERM behaves like Ctrl-C until a run takes over."""

from __future__ import annotations

import signal
from types import FrameType


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def interrupt_on_term() -> None:
    """SIGTERM acts like Ctrl-C until a run installs its own handlers (default: die without a word)."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_interrupt)
