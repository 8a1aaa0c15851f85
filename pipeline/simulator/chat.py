"""One chat completion request, understood and answered: the logic `/v1/chat/completions` and the Batch API share.

`parse_chat` turns a request body into a `ChatRequest` or the `Rejection` the real API would send (400/404);
`answer` builds the completion for it, spoiled as a malformed-reply fault asks. Transport, rate windows and
scripted exchange faults stay with the callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pipeline.simulator.replies import SPOILERS, LabelMaker, completion_body, completion_tokens, read_messages, spoil

BAD_JSON: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
SERVICE_TIERS: Final = ("auto", "default", "flex", "scale", "priority", "fast")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the simulator uses."""

    model: str
    prompt_tokens: int
    text: str  # the last user message: labels and `match` faults key on it
    response_format: Any
    completion_budget: int | None  # max_completion_tokens or max_tokens
    service_tier: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the API refuses before answering: status, message, and the error's code and param."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None


def parse_chat(body: Any, models: frozenset[str] | None) -> ChatRequest | Rejection:
    """The request's parts, or the 400/404 the real API would send instead (`models`: served ones, None: any)."""
    if not isinstance(body, dict):
        return Rejection(400, BAD_JSON)
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        return Rejection(400, "you must provide a model parameter")
    read = read_messages(messages) if isinstance(messages, list) and messages else None
    if read is None:
        message = "Invalid 'messages': expected a non-empty array of messages with text content."
        return Rejection(400, message, "invalid_type", "messages")
    if models is not None and model not in models:
        return Rejection(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")
    if body.get("stream"):
        message = "The simulator does not support stream=true; leave stream unset."
        return Rejection(400, message, "unsupported_value", "stream")
    tier = body.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        message = f"Invalid value for 'service_tier': expected one of {', '.join(SERVICE_TIERS)}, got {tier!r}."
        return Rejection(400, message, "invalid_value", "service_tier")
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    return ChatRequest(
        model,
        read[0],
        read[1],
        body.get("response_format"),
        budget if isinstance(budget, int) else None,
        tier,
    )


def served_tier(asked: str | None) -> str:
    """The tier a reply names: flex when asked for, priority for fast, else default (what `auto` resolves to)."""
    if asked in ("flex", "scale", "priority"):
        return asked
    return "priority" if asked == "fast" else "default"


def answer(
    labels: LabelMaker, chat: ChatRequest, completion_id: str, kind: str | None, content: str | None = None
) -> tuple[bytes, int]:
    """The completion body for `chat`, spoiled by the malformed-reply fault `kind` if any, and its completion tokens.

    `content`: the good reply's content when the caller has already made it.
    """
    if content is None:
        content = labels.content(chat.response_format, chat.text)
    finish, refusal = "stop", None
    if kind == "label_outside":
        content = labels.content(chat.response_format, chat.text, outside=True)
    elif kind in SPOILERS:
        content, finish, refusal = spoil(kind or "", content or "")
    completion = completion_tokens(content)
    payload = completion_body(
        completion_id,
        chat.model,
        content,
        finish_reason=finish,
        refusal=refusal,
        prompt_tokens=chat.prompt_tokens,
        completion_tokens=completion,
        service_tier=served_tier(chat.service_tier),
    )
    return payload, completion
