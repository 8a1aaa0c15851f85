"""One chat-completion request for a row, and what its reply means: shared by every engine.

The online client posts `request_body(...)`; the Batch API engine writes the same body into request files;
both read the answer with `read_reply`, so a label means the same whichever way it travelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.prompt import Prompt, ReplyError


def request_body(prompt: Prompt, text: str, model: str, *, service_tier: str | None = None) -> dict[str, Any]:
    """The `/v1/chat/completions` body that labels `text` (`service_tier`, e.g. "flex", only when given)."""
    cfg = prompt.config
    body: dict[str, Any] = {
        "model": model,
        "messages": prompt.messages(text),
        "response_format": prompt.response_format,
        "temperature": cfg.temperature,
        "max_completion_tokens": cfg.max_tokens,
    }
    if service_tier is not None:
        body["service_tier"] = service_tier
    return body


@dataclass(frozen=True, slots=True)
class Reply:
    """A usable answer: the label (or labels), the model that gave it and the tokens it cost."""

    label: str | list[str]
    model: str | None
    prompt_tokens: int
    completion_tokens: int


def read_reply(prompt: Prompt, body: bytes | Mapping[str, Any]) -> Reply:
    """Validate a chat completion (raw bytes or parsed JSON); raise ReplyError naming what is wrong with it."""
    try:
        data = orjson.loads(body) if isinstance(body, bytes | bytearray) else body
        label = prompt.parse(data["choices"][0])
    except ReplyError:
        raise
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        shown = body[:120] if isinstance(body, bytes | bytearray) else str(body)[:120]
        raise ReplyError("malformed", f"the reply is not a chat completion: {shown!r}") from None
    usage = data.get("usage")
    model = data.get("model")
    return Reply(
        label=label,
        model=str(model) if model else None,
        prompt_tokens=token_count(usage, "prompt_tokens"),
        completion_tokens=token_count(usage, "completion_tokens"),
    )


def token_count(usage: Any, key: str) -> int:
    """A token count from `usage`, or 0 when the server sent none (or nonsense): usage is informational."""
    value = usage.get(key) if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
