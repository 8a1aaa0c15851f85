"""Pay once per distinct text: rows whose text as sent is identical share one request.

A row's `text_sha` fingerprints the text after the task's template and `max_chars`, and the messages of a
request depend on nothing else, so two rows with one fingerprint would get one answer. Before the run, one pass
over the input finds the fingerprints worth remembering: those of rows still to label that occur more than once,
or that the sink already labeled under another id. Only those are kept (an int each, plus one small `Original`
per distinct repeated text once it is labeled), so memory grows with the repeated texts, not with the input.

The first row with such a text is sent; the others become copies of its record (`copied_from` names its id,
tokens and cost are zero). A copy is handed to the writer only after its original, in the same queue, so the
sink never holds a copy without its original, and a crash between them leaves the copy for the next run, which
copies it from the sink without a request.

With `normalized` matching (--dedupe normalized), a row's key is the fingerprint of its text with runs of
whitespace made one space and case folded, computed from the input rows only. The sink keeps only the exact
`text_sha`, so a sink record is found through an input row with exactly its text: that row's normalised key then
points at the record, and every row sharing that key copies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.results import Failed, Labeled, Row, now_iso, text_sha

Matching = Literal["exact", "normalized"]

COPY_OF_FAILED = "copy_of_failed"  # dead-letter kind of a copy whose original failed (retried next run)


def sha_key(sha: str | None) -> int | None:
    """The 64-bit int of a `text_sha` (None: not a fingerprint, e.g. a sink written before text_sha)."""
    if not sha:
        return None
    try:
        return int(sha, 16)
    except ValueError:
        return None


def exact_key(row: Row) -> int:
    """A row's key under exact matching: its `text_sha` as an int."""
    return int(row.sha, 16)


def normalized_key(row: Row) -> int:
    """A row's key under normalised matching: the fingerprint of its text with whitespace runs as one space and
    case folded, so "Great  product" and "great product" share one request."""
    return int(text_sha(" ".join(row.text.split()).casefold()), 16)


def key_of(matching: Matching) -> Callable[[Row], int]:
    """The key function of a matching mode (RunOptions.dedupe_match)."""
    return normalized_key if matching == "normalized" else exact_key


@dataclass(frozen=True, slots=True)
class Original:
    """What a copy takes from the record it copies."""

    id: str
    label: str | list[str]
    model: str
    confidence: float | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, item: Labeled) -> Original:
        """The original of a row labeled in this run."""
        return cls(item.row.id, item.label, item.model, item.confidence, item.extras)

    def copy_for(self, row: Row) -> Labeled:
        """`row`'s own record: this original's answer, no request, no tokens."""
        return Labeled(
            row=row,
            label=self.label,
            model=self.model,
            prompt_tokens=0,
            completion_tokens=0,
            latency_ms=0.0,
            attempts=0,
            labeled_at=now_iso(),
            confidence=self.confidence,
            extras=self.extras,
            copied_from=self.id,
        )


def _counted(keys: Iterable[int]) -> tuple[set[int], set[int]]:
    """Every key, and the keys that occur more than once."""
    once: set[int] = set()
    twice: set[int] = set()
    for key in keys:
        if key in once:
            twice.add(key)
        else:
            once.add(key)
    return once, twice


class Dedupe:
    """Which rows of a run are sent and which are copies; the copies waiting for an original in flight."""

    def __init__(
        self, wanted: set[int], known: dict[int, Original] | None = None, key: Callable[[Row], int] = exact_key
    ) -> None:
        self.key = key  # the row's text fingerprint, exact or normalised (`key_of`)
        self.wanted = wanted  # fingerprints of texts with more than one row to label, or already in the sink
        self.known: dict[int, Original] = known or {}  # labeled (in the sink, or handed to its writer)
        self.sent: set[int] = set()  # of `wanted`, the texts whose first row the gate let through
        self.waiting: dict[int, list[Row]] = {}  # original in flight → rows that copy it when it is done

    @classmethod
    def plan(
        cls,
        rows: Iterable[Row],
        records: Iterator[dict[str, Any]],
        *,
        outputs: Sequence[str] = (),
        matching: Matching = "exact",
    ) -> Dedupe:
        """From the input rows still to label and the sink's records (which become `known` originals)."""
        key_fn = key_of(matching)
        # Sink records carry the exact fingerprint only: map it to the row's key (itself, when matching is exact).
        keys: dict[int, int] = {}

        def keyed(row: Row) -> int:
            key = key_fn(row)
            if matching != "exact":
                keys[exact_key(row)] = key
            return key

        distinct, wanted = _counted(keyed(row) for row in rows)
        known: dict[int, Original] = {}
        for rec in records:
            sha = sha_key(rec.get("text_sha"))
            key = sha if matching == "exact" else keys.get(sha) if sha is not None else None
            if key is None or key not in distinct or key in known or rec.get("label") is None:
                continue
            extras = {name: rec.get(name) for name in outputs}
            known[key] = Original(str(rec["id"]), rec["label"], str(rec.get("model") or ""), rec.get("confidence"),
                                  extras)  # fmt: skip
            wanted.add(key)
        return cls(wanted, known, key_fn)

    def is_copy(self, row: Row) -> bool:
        """Whether `row` would be a copy (its text was let through before, or is in the sink); changes nothing."""
        key = self.key(row)
        return key in self.wanted and (key in self.sent or key in self.known)

    def first(self, row: Row) -> None:
        """`row` is sent: later rows with its text copy it."""
        key = self.key(row)
        if key in self.wanted:
            self.sent.add(key)

    def copy_now(self, row: Row) -> Labeled | None:
        """`row`'s copy when its original is labeled; else None and `row` waits for it (`settle`)."""
        key = self.key(row)
        original = self.known.get(key)
        if original is not None:
            return original.copy_for(row)
        self.waiting.setdefault(key, []).append(row)
        return None

    def settle(self, result: Labeled | Failed) -> list[Labeled | Failed]:
        """The records of the rows that waited for `result`'s row: copies, or dead letters if it failed."""
        key = self.key(result.row)
        if key not in self.wanted:
            return []
        rows = self.waiting.pop(key, [])
        if isinstance(result, Labeled):
            original = self.known[key] = Original.of(result)
            return [original.copy_for(row) for row in rows]
        self.sent.discard(key)  # later rows with this text are sent again
        message = f"the row with the same text ({result.row.id}) failed ({result.kind}); retried by the next run"
        return [
            Failed(row=row, kind=COPY_OF_FAILED, message=message, attempts=0, status=None, failed_at=now_iso())
            for row in rows
        ]
