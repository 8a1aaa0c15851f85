"""Results back into the sink: every line of an output or error file, OpenAI's or vLLM `run_batch`'s, is
validated exactly like an online reply (`request.read_reply`), joined to its row by `custom_id` alone (lines
come in any order), and appended at most once: a row already in the sink is skipped and counted.

A result line is `{"custom_id": ..., "response": {"status_code": ..., "body": ...} | null, "error": ... | null}`.
A 200 body is a chat completion; another status, or an `error`, fails the row, with the message read from
wherever the runner put it: OpenAI's `response.body.error` or `error: {code, message}`, vLLM `run_batch`'s
whole error response under `error` (`{"error": {"message", "type", "code": 400}}`, body null), or its
older plain string. Code `batch_expired` (and `batch_cancelled`) means the request never ran:
the row is not failed but unfinished, and the next run sends it again.

A request the server refused as sent (400, 404, 413, 422: the context is too long, a parameter is wrong) fails
the same way every time, so its dead letter keeps the request's fingerprint (`files.request_sha`), and batch runs
and `batch prepare` leave the row out while its request is unchanged (`refused_requests`). A context too long
gets its own kind, `context_length`, and advice on what to change (`REFUSED_ADVICE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from pipeline.api.errors import refusal_kind
from pipeline.api.request import Reply, read_reply
from pipeline.engines.batch.files import request_sha
from pipeline.input.ids import IdSet
from pipeline.results import Failed, Labeled, Row, now_iso, sha_tag
from pipeline.sinks import Sink, SinkMeta
from pipeline.stats import RunStats
from pipeline.task.prompt import Prompt, ReplyError

UNFINISHED_CODES: Final = frozenset({"batch_expired", "batch_cancelled"})
_APPEND_EVERY: Final = 5000
# Statuses that refuse the request itself: sent again unchanged, it fails again (429, 408, 409, 5xx are luck).
_REFUSING: Final = frozenset({400, 404, 413, 422})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one result line says about its row: a usable reply, or why there is none."""

    reply: Reply | None
    kind: str = ""
    message: str = ""
    status: int | None = None
    unfinished: bool = False  # the request never ran (its batch expired or was cancelled)
    refused: bool = False  # refused as sent: the same request fails the same way
    # An unusable reply's usage: the provider billed it like a good one.
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_result(prompt: Prompt, line: bytes) -> tuple[str, Outcome] | None:
    """The custom_id of a result line and its outcome; None for a line that names no custom_id."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        return None
    error, response = data.get("error"), data.get("response")
    if error:
        code, message = _error_parts(error)
        if code in UNFINISHED_CODES:
            return custom_id, Outcome(None, code or "", message, unfinished=True)
        if not isinstance(response, dict) or response.get("status_code") in (None, 200):
            return custom_id, Outcome(None, code or "batch_error", message)
    if not isinstance(response, dict):
        return custom_id, Outcome(None, "malformed", "the result line has neither a response nor an error")
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        code, message = _error_parts(body if isinstance(body, dict) and body.get("error") else error)
        status = status if isinstance(status, int) else None
        text = f"HTTP {status}{f' {code}' if code else ''}: {message}"
        if status in _REFUSING:
            return custom_id, Outcome(None, refusal_kind(code, message), text, status=status, refused=True)
        return custom_id, Outcome(None, _status_kind(status), text, status=status)
    try:
        return custom_id, Outcome(read_reply(prompt, body if isinstance(body, dict) else {}), status=200)
    except ReplyError as exc:
        read, made = exc.prompt_tokens, exc.completion_tokens  # billed like a usable reply
        return custom_id, Outcome(None, exc.kind, exc.message, 200, prompt_tokens=read, completion_tokens=made)


def read_results(prompt: Prompt, paths: Iterable[Path], into: dict[str, Outcome]) -> tuple[int, int]:
    """Add the outcomes of every line of `paths` to `into` (the first line for an id wins);
    returns (lines that name no custom_id, repeated ids)."""
    unreadable = repeated = 0
    for path in paths:
        with path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                found = read_result(prompt, line)
                if found is None:
                    unreadable += 1
                elif found[0] in into:
                    repeated += 1
                else:
                    into[found[0]] = found[1]
    return unreadable, repeated


@dataclass(slots=True)
class Tally:
    """What a merge did with the rows it was given."""

    labeled: int = 0
    failed: int = 0
    unfinished: int = 0
    skipped: int = 0  # already in the sink: not appended again

    def add(self, other: Tally) -> None:
        """Count in another merge's tally."""
        self.labeled += other.labeled
        self.failed += other.failed
        self.unfinished += other.unfinished
        self.skipped += other.skipped

    def as_dict(self) -> dict[str, int]:
        """JSON form, as the ledger keeps it."""
        return {"labeled": self.labeled, "failed": self.failed, "unfinished": self.unfinished, "skipped": self.skipped}


def refused_requests(meta: SinkMeta) -> dict[str, str]:
    """Row id → fingerprint of its request that a server refused as sent (the latest refusal of each row)."""
    refused: dict[str, str] = {}
    for letter in meta.read_dead_letters():
        sha = letter.get("request_sha")
        if isinstance(sha, str) and isinstance(letter.get("id"), str):
            refused[letter["id"]] = sha
    return refused


class Merger:
    """Turns outcomes into sink records and dead letters, appending each id at most once; `prompt` fingerprints
    the requests refused as sent."""

    def __init__(self, sink: Sink, done: IdSet, stats: RunStats, run_id: str, model: str, *, prompt: Prompt) -> None:
        self.sink, self.done, self.stats, self.run_id, self.model = sink, done, stats, run_id, model
        self.prompt = prompt

    async def merge(
        self,
        rows: Iterable[Row],
        outcomes: dict[str, Outcome],
        *,
        latency_ms: float = 0.0,
        only_answered: bool,
        default: Outcome | None = None,
    ) -> Tally:
        """Settle `rows` by their outcomes (used outcomes are removed from `outcomes`).

        only_answered: rows without an outcome are none of this merge's business (results from elsewhere);
        otherwise a row without one takes `default`, or else came back unprocessed (unfinished).
        """
        tally = Tally()
        labeled: list[Labeled] = []
        failed: list[Failed] = []
        for row in rows:
            outcome = outcomes.pop(row.id, None)
            if outcome is None and only_answered:
                continue
            outcome = outcome or default
            if row.id in self.done:
                tally.skipped += 1
            elif outcome is None or outcome.unfinished:
                tally.unfinished += 1
            elif outcome.reply is not None:
                labeled.append(self._labeled(row, outcome.reply, latency_ms))
                self.done.add(row.id, sha_tag(row.sha))
                if len(labeled) >= _APPEND_EVERY:
                    await self._append(labeled, tally)
                    labeled = []
            else:
                sha = request_sha(self.prompt, row, self.model) if outcome.refused else None
                failed.append(Failed(row, outcome.kind, outcome.message, 1, outcome.status, now_iso(), sha))
                self.stats.refused += outcome.refused
                self._billed(outcome)
        await self._append(labeled, tally)
        if failed:
            await self.sink.append_dead_letters(failed, self.run_id)
            for item in failed:
                self.stats.record_failure(item.kind, item.row.id, item.message)
            tally.failed += len(failed)
        self.stats.unfinished += tally.unfinished
        return tally

    def _labeled(self, row: Row, reply: Reply, latency_ms: float) -> Labeled:
        self.stats.calls.logprobs_unread += reply.logprobs_unread
        return Labeled(
            row=row,
            label=reply.label,
            model=reply.model or self.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_ms=latency_ms,
            attempts=1,
            labeled_at=now_iso(),
            cached_tokens=reply.cached_tokens,
            confidence=reply.confidence,
            extras=reply.extras,
        )

    def _billed(self, outcome: Outcome) -> None:
        """Count (and so price, at batch prices) the usage of a reply that gave no label."""
        if outcome.prompt_tokens or outcome.completion_tokens:
            stats = self.stats
            stats.calls.unusable_replies += 1
            stats.calls.unusable_tokens += outcome.prompt_tokens + outcome.completion_tokens
            stats.batch_prompt_tokens += outcome.prompt_tokens
            stats.batch_completion_tokens += outcome.completion_tokens

    async def _append(self, labeled: list[Labeled], tally: Tally) -> None:
        if not labeled:
            return
        await self.sink.append(labeled)
        stats = self.stats
        stats.labeled += len(labeled)
        stats.saved += len(labeled)
        stats.batch_prompt_tokens += sum(item.prompt_tokens for item in labeled)
        stats.batch_completion_tokens += sum(item.completion_tokens for item in labeled)
        tally.labeled += len(labeled)


def _error_parts(error: Any) -> tuple[str | None, str]:
    """(code, message) of an error object, one wrapped in `{"error": ...}` (vLLM nests it), a plain string,
    or nothing."""
    for _ in range(3):  # unwrap {"error": {"error": {...}}}, never forever
        if isinstance(error, dict) and isinstance(error.get("error"), dict | str) and not error.get("message"):
            error = error["error"]
    if isinstance(error, dict):
        # A string code names the failure; vLLM's `code` repeats the HTTP status, so its `type` says more.
        code = error.get("code") if isinstance(error.get("code"), str) else None
        code = code or error.get("type")
        message = error.get("message") or error.get("detail") or ""
        return (str(code) if code else None), str(message)[:300] or "no reason given"
    if error:
        return None, str(error)[:300]
    return None, "no reason given"


def _status_kind(status: int | None) -> str:
    """The dead-letter kind of an HTTP status, named as the online client names it."""
    if status == 429:
        return "rate_limit"
    if status in (408, 409):
        return f"http_{status}"
    if status is not None and status >= 500:
        return "server_error"
    return "bad_request"
