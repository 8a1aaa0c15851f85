"""What flows through a run: input `Row`s, their outcomes (`Labeled`, `Failed`), and the one sink record layout.

This is the bottom layer: it imports nothing of the pipeline, and every other module (the reader, the
client, both sinks, export, status) takes the record's fields from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any, Final

import orjson


def now_iso() -> str:
    """UTC time with milliseconds, e.g. 2026-11-27T01:44:37.123Z (the format of `labeled_at`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def text_sha(text: str) -> str:
    """The fingerprint of a row's text as sent: 16 hex digits of BLAKE2b (the `text_sha` column)."""
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def sha_tag(sha: str | None) -> int:
    """The 16-bit tag of a text fingerprint that id sets keep beside each id (0: unknown)."""
    if not sha:
        return 0
    try:
        return int(sha[-4:], 16) or 1
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Row:
    """One input record: its id, the text to label, the columns to carry, and any input problem.

    `line` is the record's 1-based position among data rows; `problem` names why the row cannot be
    sent (e.g. "empty_text"), with `detail` saying what the user can do about it.
    """

    id: str
    text: str
    line: int
    carry: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None
    detail: str = ""
    truncated: bool = False

    @property
    def sha(self) -> str:
        """Fingerprint of the text this row sends (see `text_sha`)."""
        return text_sha(self.text)


@dataclass(frozen=True, slots=True)
class Labeled:
    """A row the model labeled; becomes one sink record."""

    row: Row
    label: str | list[str]
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    attempts: int
    labeled_at: str
    cached_tokens: int = 0  # the part of prompt_tokens served from the provider's prompt cache
    confidence: float | None = None  # probability of the label from the reply's logprobs (None: none sent)
    extras: Mapping[str, Any] = field(default_factory=dict)  # the task's extra output fields, validated
    copied_from: str | None = None  # a copy: the id whose record (same text) it repeats, without a request


@dataclass(frozen=True, slots=True)
class Failed:
    """A row that could not be labeled; becomes one dead letter (and is retried by the next run)."""

    row: Row
    kind: str
    message: str
    attempts: int
    status: int | None
    failed_at: str
    # The fingerprint of a batch request the provider refused as sent (context too long, bad request): the same
    # request would fail the same way, so batch runs leave the row out until its request changes.
    request_sha: str | None = None


Result = Labeled | Failed

# The sink record, in write order: LEADING, then the task's extra output fields, then the carried input
# columns, then TRAILING. `id` comes first so a JSONL reader can take it without parsing the line. Kinds are
# logical; each sink maps them to its types. An extra output field's kind is one of OUTPUT_KINDS, or
# "list:" and one of them (see `config.OutputField`).
LEADING: Final[tuple[tuple[str, str], ...]] = (("id", "string"), ("label", "label"), ("confidence", "float32"))
TRAILING: Final[tuple[tuple[str, str], ...]] = (
    ("model", "string"),
    ("prompt_tokens", "int32"),
    ("completion_tokens", "int32"),
    ("cached_tokens", "int32"),
    ("latency_ms", "float32"),
    ("attempts", "int16"),
    ("truncated", "bool"),
    ("text_sha", "string"),
    ("labeled_at", "timestamp"),
    ("copied_from", "string"),  # last: sinks written before it lack only this column
)
RECORD_FIELDS: Final = tuple(name for name, _ in (*LEADING, *TRAILING))
OUTPUT_KINDS: Final = ("string", "int64", "float64", "bool")

# How each fixed field is read off a result; carried columns come from `row.carry`.
GETTERS: Final[dict[str, Callable[[Labeled], Any]]] = {
    "id": lambda item: item.row.id,
    "label": lambda item: item.label,
    "confidence": lambda item: item.confidence,
    "model": lambda item: item.model,
    "prompt_tokens": lambda item: item.prompt_tokens,
    "completion_tokens": lambda item: item.completion_tokens,
    "cached_tokens": lambda item: item.cached_tokens,
    "latency_ms": lambda item: item.latency_ms,
    "attempts": lambda item: item.attempts,
    "truncated": lambda item: item.row.truncated,
    "text_sha": lambda item: item.row.sha,
    "labeled_at": lambda item: item.labeled_at,
    "copied_from": lambda item: item.copied_from,
}


def record(item: Labeled) -> dict[str, Any]:
    """The sink record of one labeled row: LEADING fields, extra output fields, carried columns, TRAILING fields."""
    out = {name: GETTERS[name](item) for name, _ in LEADING}
    out.update(item.extras)
    out.update(item.row.carry)
    out.update((name, GETTERS[name](item)) for name, _ in TRAILING)
    return out


# A row unusable as read (empty text, missing id, ragged) whose reader named no reason. Sinks written by the
# Ray engine before one kind was kept call it "problem": read back as this kind.
BAD_ROW: Final = "bad_row"
OLD_KINDS: Final = {"problem": BAD_ROW}


def problem_failure(row: Row) -> Failed:
    """The dead letter of a row that is unusable as read: no request is sent for it."""
    return Failed(
        row=row, kind=row.problem or BAD_ROW, message=row.detail, attempts=0, status=None, failed_at=now_iso()
    )


def new_run_id() -> str:
    """A short random id that marks one run's dead letters and progress file."""
    return os.urandom(6).hex()


def dead_letter(item: Failed, run_id: str) -> dict[str, Any]:
    """The dead-letter record of a failed row."""
    return {
        "id": item.row.id,
        "line": item.row.line,
        "kind": item.kind,
        "message": item.message,
        "attempts": item.attempts,
        "status": item.status,
        "failed_at": item.failed_at,
        "run": run_id,
        **({"request_sha": item.request_sha} if item.request_sha else {}),
    }


def encode_dead_letters(items: Sequence[Failed], run_id: str) -> list[bytes]:
    """Each failed row's dead letter as one JSON line (a list, so a writer can append them one write each)."""
    return [orjson.dumps(dead_letter(item, run_id)) + b"\n" for item in items]
