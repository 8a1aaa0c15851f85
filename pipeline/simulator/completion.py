"""The parts of a chat completion exchange around the reply's content: reading the request's messages, the
usage estimates, the malformed-reply faults that spoil a good reply, and the `chat.completion` body itself."""

from __future__ import annotations

import time
from typing import Any, Final

import orjson

_FINGERPRINT: Final = "fp_5b1ee9e4d1"


def read_messages(messages: list[Any]) -> tuple[list[str], str] | None:
    """The text of every message and the last user text; None if a message is malformed."""
    contents: list[str] = []
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            return None
        contents.append(content)
        if message.get("role") == "user":
            last_user = content
    return contents, last_user


def completion_tokens(content: str | None) -> int:
    """Estimate the tokens of a reply: ceil(chars / 4)."""
    return -(-len(content) // 4) if content else 0


REFUSAL_TEXT: Final = "I'm sorry, but I can't help with that request."
# Malformed-reply faults that rewrite a good reply (label_outside needs the schema, so it is made upstream).
SPOILERS: Final = frozenset({"bad_json_content", "empty_content", "extra_text", "length", "content_filter", "refusal"})


def spoil(kind: str, content: str) -> tuple[str | None, str, str | None]:
    """(content, finish_reason, refusal) of a good reply spoiled by the malformed-reply fault `kind`."""
    if kind == "bad_json_content":
        # Python-style quotes: the commonest way a model's "JSON" fails to parse.
        spoiled = content.replace('"', "'")
        return (spoiled if spoiled != content else content + "}"), "stop", None
    if kind == "empty_content":
        return "", "stop", None
    if kind == "extra_text":
        return f"Sure! Here is the classification you asked for: {content} Hope this helps!", "stop", None
    if kind == "length":
        return content[: max(1, len(content) // 2)], "length", None
    if kind == "content_filter":
        return None, "content_filter", None
    if kind == "refusal":
        return None, "stop", REFUSAL_TEXT
    return content, "stop", None


# What a server fills a reply with when the request names no max_tokens (the room left in a small context).
DEFAULT_BUDGET: Final = 4096


def padded(budget: int | None) -> tuple[str, int]:
    """(content, completion tokens) of a reply padded with whitespace until `budget` tokens: "{" then newlines,
    one token each, as a grammar-constrained model writes while it cannot decide."""
    tokens = max(1, budget if budget is not None else DEFAULT_BUDGET)
    return "{" + "\n" * (tokens - 1), tokens


def completion_body(
    completion_id: str,
    model: str,
    content: str | None,
    *,
    finish_reason: str = "stop",
    refusal: str | None = None,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    logprobs: list[dict[str, Any]] | None = None,
    service_tier: str = "default",
) -> bytes:
    """A `chat.completion` object as the real API sends it (`logprobs`: its `logprobs.content`, when asked)."""
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
                    "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": reasoning_tokens,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": service_tier,
            "system_fingerprint": _FINGERPRINT,
        }
    )


class BadParameterError(ValueError):
    """A request parameter the real API would refuse with a 400 naming it."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def top_logprobs_asked(body: dict[str, Any], mode: str) -> int | None:
    """How many alternatives a request wants per token (0: logprobs alone), None when it wants no logprobs.

    `mode` is the simulator's `logprobs` setting: "reject" refuses them as reasoning models do. Raises
    BadParameterError for what the API refuses: a non-boolean `logprobs`, `top_logprobs` outside 0..20 or without
    `logprobs: true`.
    """
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadParameterError(
            "logprobs", f"Invalid type for 'logprobs': expected a boolean, but got {wanted!r}.", "invalid_type"
        )
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        message = f"Invalid 'top_logprobs': expected an integer from 0 to 20, got {top!r}."
        raise BadParameterError("top_logprobs", message)
    if top is not None and not wanted:
        raise BadParameterError("top_logprobs", "Invalid value for 'top_logprobs': 'logprobs' must be set to true.")
    if not wanted:
        return None
    if mode == "reject":
        raise BadParameterError(
            "logprobs", "Unsupported parameter: 'logprobs' is not supported with this model.", "unsupported_parameter"
        )
    return top or 0
