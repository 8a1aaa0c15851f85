"""Failures read for what they are, so that the client stops, retries or gives up for the right reason.

- An endpoint that is not there (connection refused, a host name that does not resolve, TLS that fails) or that
  is no OpenAI-compatible API (an HTML page, a 404 from a web server) says so at once; the SDK's transport
  reports all of these as a timeout, so `connection_problem` reads the exception's causes instead.
- A failure that a temperature-0 request will repeat (a reply cut off at max_tokens, a label outside the set,
  no JSON) is no bad luck: `Streak` notices the same one again and again before anything has succeeded, and
  `advice` says what to change.
- A reply cut off at max_tokens gets one more try with room to finish (`roomier`), not the row's every retry.
- Rows that fail that way before anything has succeeded are held back (`FailureWatch.sift`): if the streak then
  stops the run, the trouble is the endpoint's or the task's, not theirs, so they are no dead letters (they stay
  unlabeled, and the next run sends them like any other); if the run goes on, they are dead letters as usual.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Mapping
from typing import Final

from pipeline.errors import FatalApiError, clip
from pipeline.results import Failed, Result
from pipeline.stats import CallStats
from pipeline.task.prompt import ReplyError

# Unusable replies of one kind in a row, with no success at all, after which the run stops.
STREAK_BREAKER: Final = 20
# Replies that are not an API's (an HTML page answered with 200) in a row, with no success, that stop the run:
# a proxy's one-off error page is retried, a web server at --base-url is not.
NOT_API_BREAKER: Final = 3
# Attempts that could not connect, with no success at all, that stop the run (a few: one blip is retried).
UNREACHABLE_BREAKER: Final = 3
# Rows held back while every reply fails alike (see `FailureWatch.sift`): a bound on memory, far above what a streak
# of STREAK_BREAKER replies can fail.
MOST_HELD: Final = 1000
# A retry of a reply cut off at max_tokens asks for twice as many, up to this (or the task's, if larger).
ROOMIER_CAP: Final = 8192
# Gateways that name themselves in reply headers (LiteLLM 1.108.7: x-litellm-version on replies, x-litellm-call-id
# on errors too, as recorded in tests/data/compat).
_GATEWAY_HEADERS: Final = (("x-litellm-version", "litellm"), ("x-litellm-call-id", "litellm"))
_TITLE: Final = re.compile(rb"<title[^>]*>\s*(.*?)\s*</title>", re.I | re.S)

_ADVICE: Final[dict[str, str]] = {
    "length": (
        "every reply was cut off at max_tokens, also with twice the room. Raise max_tokens in the task file; "
        "a model under structured output that pads with whitespace until max_tokens needs a server setting "
        "instead (vLLM: disable_any_whitespace in its structured-output settings) or a stronger model"
    ),
    "invalid_json": (
        "the model does not answer with JSON. Does the endpoint honour response_format (json_schema)? Use a "
        "model or server that supports structured output"
    ),
    "malformed": "the replies are not chat completions. Check --base-url: it should be an OpenAI-compatible API",
    "invalid_label": (
        "the model answers with labels outside the task's set. Check the labels and instructions in the task "
        "file, or use a stronger model"
    ),
    "invalid_output": "the replies lack the task's extra output fields or give wrong values. Check the task file",
    "empty_reply": "the model sends empty replies. Check the model and the task's instructions",
    "refusal": "the model refuses the task. Check the task's instructions, or use another model",
    "content_filter": "the provider's content filter withholds every reply. Check the task's instructions",
}
DETERMINISTIC: Final = frozenset(_ADVICE)


def advice(kind: str) -> str:
    """What to change when every reply fails with `kind` (one of DETERMINISTIC)."""
    return _ADVICE[kind]


def roomier(max_tokens: int) -> int:
    """The max_tokens of the one retry of a reply cut off at `max_tokens`: twice as many, bounded."""
    return max(max_tokens, min(2 * max_tokens, ROOMIER_CAP))


class Streak:
    """Counts unusable replies of one kind in a row; any other outcome starts the count again."""

    __slots__ = ("count", "kind")

    def __init__(self) -> None:
        self.kind: str | None = None
        self.count = 0

    def note(self, kind: str) -> int:
        """Count one unusable reply of `kind`; return how many of that kind came in a row."""
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind = kind
        return self.count

    def reset(self) -> None:
        """Something else happened (a success, another kind of failure)."""
        self.kind, self.count = None, 0


class FailureWatch:
    """Counts what failed attempts cost, and stops the run (FatalApiError) when, with nothing succeeded yet, they
    say every row would fail the same way: no endpoint can be reached, the server is no API, or the replies are
    unusable the same way again and again."""

    def __init__(self, stats: CallStats, endpoints: int) -> None:
        self.stats = stats
        self.endpoints = endpoints
        self.streak = Streak()
        self.unreachable: set[str] = set()  # endpoints no connection could be made to, before any success
        self.held: list[Failed] = []  # rows failed as every reply so far did: dead letters only if the run goes on
        self.stopped_by: str | None = None  # the failure kind whose streak stopped the run

    def sift(self, result: Result) -> list[Result]:
        """The results that are final now: `result` and rows held before it, or none while `result` is a row
        that failed in a deterministic way before anything succeeded (held until a success or `settle`)."""
        if isinstance(result, Failed) and self._holds(result):
            return []
        if not self.held or self.stats.successes == 0:
            return [result]
        held, self.held = self.held, []
        return [*held, result]

    def _holds(self, failed: Failed) -> bool:
        """Hold `failed` back if it failed in a deterministic way while nothing has succeeded (up to MOST_HELD)."""
        if self.stats.successes or failed.kind not in DETERMINISTIC or len(self.held) >= MOST_HELD:
            return False
        self.held.append(failed)
        return True

    def settle(self) -> list[Failed]:
        """At the end of the run: the held rows that are dead letters after all; not those of the kind whose streak
        stopped the run (one cause, the endpoint's or the task's, which its stop message names)."""
        held, self.held = self.held, []
        return [failed for failed in held if failed.kind != self.stopped_by]

    def unusable(self, error: ReplyError, body: bytes, content_type: str | None, where: str) -> None:
        """An unusable reply: its tokens are billed like a good one's; a streak of its kind may end the run."""
        stats = self.stats
        stats.unusable_replies += 1
        stats.unusable_tokens += error.prompt_tokens + error.completion_tokens
        stats.prompt_tokens += error.prompt_tokens
        stats.completion_tokens += error.completion_tokens
        stats.cached_tokens += error.cached_tokens
        if stats.successes:
            return
        shown = not_an_api(200, content_type, body) if error.kind == "malformed" else None
        streak = self.streak.note("not_api" if shown else error.kind)
        if shown and streak >= NOT_API_BREAKER:
            self.stopped_by = error.kind
            raise no_api(where, shown, 200)
        if error.kind in DETERMINISTIC and streak >= STREAK_BREAKER:
            self.stopped_by = error.kind
            raise FatalApiError(
                f"the first {streak} replies were all unusable the same way ({error.kind}: "
                f"{clip(error.message, 120)}); retrying will not help: {advice(error.kind)}. Then re-run the same "
                "command to resume.",
                cause="reply",
            )

    def error_reply(self, status: int, content_type: str | None, body: object, where: str) -> None:
        """An error reply: a web page or a framework's 404 where the API should be ends the run."""
        first = self.stats.successes == 0 and 400 <= status < 500 and status not in (408, 409, 429)
        if (first or status == 404) and (shown := not_an_api(status, content_type, body)):
            raise no_api(where, shown, status)

    def no_connection(self, where: str, problem: tuple[str, str]) -> str:
        """The failure kind of an attempt that could not connect; the run ends once no endpoint can be reached."""
        if self.stats.successes:  # a server that answered before is retried as any passing trouble
            return "connection"
        self.unreachable.add(where)
        if len(self.unreachable) >= self.endpoints:
            what, check = problem
            raise FatalApiError(
                f"cannot connect to {', '.join(sorted(self.unreachable))}: {what}; {check} Nothing was sent; "
                "re-run the same command once the server answers.",
                cause="unreachable",
            )
        return "unreachable"


def no_api(where: str, shown: str, status: int) -> FatalApiError:
    """The stop for an endpoint that answers, but not as an OpenAI-compatible API."""
    return FatalApiError(
        f"{where} is not an OpenAI-compatible API: it answered POST /chat/completions with {shown}. Check "
        "--base-url (such servers usually serve under .../v1), then re-run the same command.",
        status=status,
        cause="endpoint",
    )


def connection_problem(exc: BaseException) -> tuple[str, str] | None:
    """(what went wrong, what to check) when no connection could be made, or None for other trouble.

    The SDK's aiohttp transport raises a timeout for a refused connection too; the cause chain says which.
    """
    seen: set[int] = set()
    inner: BaseException | None = exc
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused", "is the server running, and listening on that port?"
        if isinstance(inner, socket.gaierror):
            return f"the host name does not resolve ({inner.strerror or inner})", "check the host in --base-url"
        if isinstance(inner, ssl.SSLError):
            reason = getattr(inner, "reason", None) or inner.strerror or str(inner)
            return f"TLS failed ({reason})", "does the server speak https (a local server usually wants http://)?"
        inner = inner.__cause__ or inner.__context__
    return None


def not_an_api(status: int, content_type: str | None, body: bytes | str | object) -> str | None:
    """How a reply shows that the server is no OpenAI-compatible API ("HTTP 404 with an HTML page ("Not Found")"),
    or None when it may be one (a JSON body; an error body in the OpenAI shape)."""
    raw = body.encode("utf-8", "replace") if isinstance(body, str) else body
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw).lstrip()
        if text.startswith((b"{", b"[")) and "html" not in (content_type or ""):
            return None
        title = _TITLE.search(text[:4096])
        what = "an HTML page" if title or b"<html" in text[:512].lower() else "a body that is not JSON"
        named = f' ("{title.group(1).decode("utf-8", "replace")[:80]}")' if title else ""
        return f"HTTP {status} with {what}{named}"
    if status == 404 and isinstance(body, Mapping) and not {"error", "message"} & set(body):
        # A web framework's own 404 ({"detail": "Not Found"}; the SDK passes on an OpenAI error's inner object,
        # which has a message): the path is wrong, not the model.
        return f"HTTP 404 and no OpenAI error ({clip(str(dict(body)), 80)})"
    return None


def gateway_of(headers: Mapping[str, str]) -> str | None:
    """The gateway that sent a reply, when it names itself in a header ("litellm")."""
    for header, name in _GATEWAY_HEADERS:
        if header in headers:
            return name
    return None
