"""What the batch engine is told: whether to wait, how often to look, how big a batch may be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_REQUESTS: Final = 50_000  # requests per input file (the Batch API's limit)
MAX_BYTES: Final = 200_000_000  # bytes per input file: "200 MB", read as the smaller (decimal) megabytes
ONLINE_ROWS: Final = 100  # --engine auto: rows labeled online first


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """How the batch engine runs.

    wait: poll until every batch has ended and collect it (False: return once submitted; a re-run collects).
    poll_seconds: the first wait between looks; it grows by half while nothing changes, up to poll_max_seconds.
    max_requests, max_bytes: split request files at these (never above the API's 50,000 and 200 MB).
    online_rows: --engine auto labels this many rows online before it sends the rest as batches.
    retry_refused: send again rows whose unchanged request a server refused as sent (after the server changed,
        e.g. vLLM with a larger --max-model-len); by default they are left out, since they would fail the same way.
    """

    wait: bool = True
    poll_seconds: float = 5.0
    poll_max_seconds: float = 60.0
    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_BYTES
    online_rows: int = ONLINE_ROWS
    retry_refused: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must lie in 1..{MAX_REQUESTS:,}, got {self.max_requests}")
        if not 1 <= self.max_bytes <= MAX_BYTES:
            raise ValueError(f"max_bytes must lie in 1..{MAX_BYTES:,}, got {self.max_bytes}")
        if self.poll_seconds <= 0 or self.poll_max_seconds < self.poll_seconds:
            raise ValueError("poll_seconds must be positive and at most poll_max_seconds")
