"""One chat-completion request for a row, and what its reply means: shared by every engine.

The online client posts `request_body(...)`; the Batch API engine writes the same body into request files;
both read the answer with `read_reply`, so a label means the same whichever way it travelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.api.confidence import label_confidence
from pipeline.task.prompt import Prompt, ReplyError

# Alternatives asked for at each token: enough to see every rival of a label at the point where it starts.
TOP_LOGPROBS_MAX = 20


def request_body(
    prompt: Prompt,
    text: str,
    model: str,
    *,
    logprobs: bool = True,
    service_tier: str | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The `/v1/chat/completions` body that labels `text`.

    The messages put the part every request shares (instructions, labels, examples) first and the row's
    text last, so providers' prompt caching serves the shared part. With `logprobs` the reply carries token
    probabilities, from which the label's confidence is read; endpoints that refuse them get requests
    without (see `LabelClient`). `service_tier` (e.g. "flex") is sent only when given. `max_tokens` replaces the
    task's for one retry of a reply cut off at it.
    """
    cfg = prompt.config
    body: dict[str, Any] = {
        "model": model,
        "messages": prompt.messages(text),
        "response_format": prompt.response_format,
        "temperature": cfg.temperature,
        "max_completion_tokens": max_tokens or cfg.max_tokens,
    }
    if logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = min(TOP_LOGPROBS_MAX, len(cfg.labels))
    if service_tier is not None:
        body["service_tier"] = service_tier
    return body


def rejects_logprobs(status: int, code: str | None, message: str) -> bool:
    """Whether an error reply says the endpoint (or model) does not take `logprobs` (e.g. reasoning models)."""
    return status == 400 and "logprobs" in f"{code or ''} {message}".lower()


@dataclass(frozen=True, slots=True)
class Reply:
    """A usable answer: the label (or labels), the model that gave it and the tokens it cost."""

    label: str | list[str]
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    confidence: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # Logprobs came but no confidence could be read from them (tokens that do not spell the reply): worth a
    # note, since "the endpoint sent no logprobs" would then be false.
    logprobs_unread: bool = False


def read_reply(prompt: Prompt, body: bytes | Mapping[str, Any]) -> Reply:
    """Validate a chat completion (raw bytes or parsed JSON); raise ReplyError naming what is wrong with it."""
    try:
        data = orjson.loads(body) if isinstance(body, bytes | bytearray) else body
        choice = data["choices"][0]
        if not isinstance(choice, Mapping):
            raise TypeError(choice)  # noqa: TRY301 - the one handler below names every malformed reply
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        shown = body[:120] if isinstance(body, bytes | bytearray) else str(body)[:120]
        raise ReplyError("malformed", f"the reply is not a chat completion: {shown!r}") from None
    usage = data.get("usage")
    try:
        answer = prompt.parse_answer(choice)
    except ReplyError as exc:
        # The server did the work: the caller counts (and prices) the unusable reply's tokens too.
        exc.prompt_tokens = token_count(usage, "prompt_tokens")
        exc.completion_tokens = token_count(usage, "completion_tokens")
        details = usage.get("prompt_tokens_details") if isinstance(usage, Mapping) else None
        exc.cached_tokens = token_count(details, "cached_tokens")
        raise
    model = data.get("model")
    details = usage.get("prompt_tokens_details") if isinstance(usage, Mapping) else None
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    cfg = prompt.config
    confidence = label_confidence(answer.content, tokens, answer.label, prompt.field, cfg.labels)
    return Reply(
        label=answer.label,
        model=str(model) if model else None,
        prompt_tokens=token_count(usage, "prompt_tokens"),
        completion_tokens=token_count(usage, "completion_tokens"),
        cached_tokens=token_count(details, "cached_tokens"),
        confidence=confidence,
        extras=answer.extras,
        logprobs_unread=confidence is None and isinstance(tokens, list) and bool(tokens),
    )


def token_count(usage: Any, key: str) -> int:
    """A token count from `usage`, or 0 when the server sent none (or nonsense): usage is informational."""
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
