"""What an error reply means for the run, whichever provider or gateway sent it.

Providers and gateways disagree on shapes. OpenAI says `429 insufficient_quota`; LiteLLM passes the same
upstream error on as `type: throttling_error, code: "429"` with only the message telling; an unknown model is
OpenAI's `404 model_not_found` but LiteLLM's `400 Invalid model name`; a bad key is OpenAI's 401 but can be
a LiteLLM 400 (`no_db_connection`, "Authentication Error"). `classify` reads the status, the code, the type
and the message together, so each of these stops the run after the first reply with advice about the right
thing, instead of retrying a quota 100 times or sending 20 requests before blaming the request format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from pipeline.errors import clip

_QUOTA: Final = re.compile(r"insufficient_quota|exceeded your current quota|quota (?:exceeded|exhausted)|billing", re.I)
_MODEL: Final = re.compile(
    r"model_not_found|invalid model|unknown model|model .{0,80}(?:does not exist|not found|is not supported)"
    r"|no such model|not a valid model",
    re.I,
)
# The exception names a gateway puts before an upstream message, once per layer it passed through:
# "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached ..." says "Rate limit reached ...".
_GATEWAY_PREFIXES: Final = re.compile(r"^(?:[\w.]+(?:Error|Exception)\s*(?::|\s-)\s*)+")
_KEY: Final = re.compile(
    r"invalid_api_key|incorrect api key|invalid api key|api key.{0,40}(?:invalid|missing|not valid)"
    r"|authentication error|unauthorized|no_db_connection|invalid proxy server token",
    re.I,
)


class Meaning(Enum):
    """What an error reply means for the run."""

    QUOTA = "quota"  # out of credit: stop, waiting will not help
    KEY = "key"  # the key is wrong or missing: stop
    MODEL = "model"  # the endpoint does not serve this model: stop
    RATE_LIMIT = "rate_limit"  # slow down and retry, without using up the row's retries
    RETRY = "retry"  # a passing server trouble: retry with backoff
    BAD_REQUEST = "bad_request"  # this request is wrong: dead-letter the row


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error reply, read: its status, the provider's code and message, and what it means."""

    status: int
    code: str | None
    message: str
    meaning: Meaning

    def describe(self) -> str:
        """ "HTTP 429 rate_limit_exceeded: ..." with the status shown once (gateways repeat it as the code)."""
        code = self.code if self.code and self.code != str(self.status) else None
        return f"HTTP {self.status} {code}: {self.message}" if code else f"HTTP {self.status}: {self.message}"


def error_fields(body: Any, fallback: str) -> tuple[str | None, str | None, str]:
    """(code, type, message) of an OpenAI-shaped error body (`{"error": {...}}` or the inner object)."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        body = body["error"]
    if not isinstance(body, Mapping):
        return None, None, clip(fallback, 300)
    code, kind = body.get("code"), body.get("type")
    message = _GATEWAY_PREFIXES.sub("", str(body.get("message") or fallback)) or str(body.get("message"))
    return (str(code) if code else None), (str(kind) if kind else None), clip(message, 300)


def classify(status: int, body: Any, fallback: str) -> ApiError:
    """Read an error reply (its status and parsed body; `fallback` is the message when the body has none)."""
    code, kind, message = error_fields(body, fallback)
    words = f"{code or ''} {kind or ''} {message}"
    if status == 429:
        meaning = Meaning.QUOTA if _QUOTA.search(words) else Meaning.RATE_LIMIT
    elif status in (401, 403):
        meaning = Meaning.KEY
    elif status == 404:
        meaning = Meaning.MODEL
    elif status in (408, 409) or status >= 500:
        meaning = Meaning.RETRY
    elif status == 400 and _MODEL.search(words):
        meaning = Meaning.MODEL
    elif status == 400 and _KEY.search(words):
        meaning = Meaning.KEY
    else:
        meaning = Meaning.BAD_REQUEST
    # Gateways repeat the status as the code ("400"); then the type says more ("no_db_connection").
    shown = code if code and code != str(status) else kind
    return ApiError(status, shown, message, meaning)


# How OpenAI, vLLM and others say a prompt does not fit the model's context.
_TOO_LONG: Final = re.compile(
    r"context.length|maximum context|context window|max_model_len|prompt is too long|too many (input )?tokens",
    re.IGNORECASE,
)
# What to change about a request the server refused as sent (re-sent unchanged, it fails the same way), by kind.
REFUSED_ADVICE: Final = {
    "context_length": "the text does not fit the model's context: shorten it (max_chars in the task file) or use a "
    "model with a longer context (vLLM: a larger --max-model-len)",
    "bad_request": "the server refused the request as sent: fix what its message names (the model name, a setting "
    "in the task file)",
}


def refusal_kind(code: str | None, message: str) -> str:
    """The kind of a request refused as sent (a 400-like status): `context_length` or `bad_request`."""
    too_long = code == "context_length_exceeded" or _TOO_LONG.search(message) is not None
    return "context_length" if too_long else "bad_request"


def refusal_advice(kind: str) -> str:
    """A line of advice under a failure kind that re-running would not cure ("" for other kinds)."""
    return f"\n      what to change: {REFUSED_ADVICE[kind]}" if kind in REFUSED_ADVICE else ""
