"""One chat completion request, understood and answered: the logic `/v1/chat/completions` and the Batch API share.

`Responder.parse` turns a request body into a `ChatRequest` or the `Rejection` the real API would send
(400/404); `Responder.answer` builds the completion for it: a label judged from the task's descriptions and
examples, token counts in the model's encoding, cached prompt tokens, reasoning tokens and logprobs as asked,
spoiled as a malformed-reply fault asks. Transport, rate windows and exchange faults stay with the callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pipeline.simulator.caching import PromptCache
from pipeline.simulator.completion import (
    SPOILERS,
    BadParameterError,
    completion_body,
    completion_tokens,
    padded,
    read_messages,
    spoil,
    top_logprobs_asked,
)
from pipeline.simulator.http import BAD_JSON
from pipeline.simulator.judge import Judge, as_model_of_quality, stop_token, token_logprobs
from pipeline.simulator.replies import Choice, LabelMaker
from pipeline.simulator.settings import VLLM_STOP_TOKEN, SimulatorConfig
from pipeline.simulator.tokens import TokenCounter

SERVICE_TIERS: Final = ("auto", "default", "flex", "scale", "priority", "fast")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The parts of a chat completion request the simulator uses."""

    model: str
    prompt_tokens: int
    text: str  # the last user message: labels and `match` faults key on it
    response_format: Any
    completion_budget: int | None  # max_completion_tokens or max_tokens
    messages: list[Any]
    top_logprobs: int | None  # None: no logprobs asked for
    service_tier: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request the API refuses before answering: status, message, and the error's code and param."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None


def served_tier(asked: str | None) -> str:
    """The tier a reply names: flex when asked for, priority for fast, else default (what `auto` resolves to)."""
    if asked in ("flex", "scale", "priority"):
        return asked
    return "priority" if asked == "fast" else "default"


class Responder:
    """Parses and answers chat requests with the simulator's settings in force (read at every call)."""

    def __init__(self, labels: LabelMaker, judge: Judge, cache: PromptCache, settings: Callable[[], SimulatorConfig]):
        self._labels, self._judge, self._cache, self._settings = labels, judge, cache, settings
        self._tokens: dict[str, TokenCounter] = {}

    def _counter(self, tokenizer: str) -> TokenCounter:
        if tokenizer not in self._tokens:
            self._tokens[tokenizer] = TokenCounter(exact=tokenizer == "auto")
        return self._tokens[tokenizer]

    def parse(self, body: Any) -> ChatRequest | Rejection:
        """The request's parts, or the 400/404 the real API would send instead."""
        config = self._settings()
        if not isinstance(body, dict):
            return Rejection(400, BAD_JSON)
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            return Rejection(400, "you must provide a model parameter")
        read = read_messages(messages) if isinstance(messages, list) and messages else None
        if read is None:
            message = "Invalid 'messages': expected a non-empty array of messages with text content."
            return Rejection(400, message, "invalid_type", "messages")
        if config.models is not None and model not in config.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return Rejection(404, message, "model_not_found")
        if body.get("stream"):
            message = "The simulator does not support stream=true; leave stream unset."
            return Rejection(400, message, "unsupported_value", "stream")
        tier = body.get("service_tier")
        if tier is not None and tier not in SERVICE_TIERS:
            message = f"Invalid value for 'service_tier': expected one of {', '.join(SERVICE_TIERS)}, got {tier!r}."
            return Rejection(400, message, "invalid_value", "service_tier")
        try:
            top = top_logprobs_asked(body, config.logprobs)
        except BadParameterError as bad:
            return Rejection(400, bad.message, bad.code, bad.param)
        budget = body.get("max_completion_tokens") or body.get("max_tokens")
        prompt_tokens = self._counter(config.tokenizer).prompt_tokens(model, read[0])
        return ChatRequest(
            model,
            prompt_tokens,
            read[1],
            body.get("response_format"),
            budget if isinstance(budget, int) else None,
            messages or [],
            top,
            tier,
        )

    def content(self, chat: ChatRequest) -> tuple[str, list[Choice]]:
        """The good reply's content and the label choices in it (judged from the task's own words)."""
        scores: Mapping[str, float] | None = self._judge.scores(chat.messages)
        quality = (self._settings().model_quality or {}).get(chat.model)
        if scores is not None and quality is not None:
            scores = as_model_of_quality(scores, chat.model, chat.text, quality)
        return self._labels.answer(chat.response_format, chat.text, scores=scores)

    def answer(
        self, chat: ChatRequest, completion_id: str, kind: str | None, made: tuple[str, list[Choice]] | None = None
    ) -> tuple[bytes, int]:
        """The completion body for `chat`, spoiled by the malformed-reply fault `kind` if any, and its completion
        tokens (reasoning included). `made`: the good reply's content and choices when the caller has them."""
        config = self._settings()
        content: str | None
        content, choices = made if made is not None else self.content(chat)
        finish, refusal = "stop", None
        if config.pad_whitespace and content and content.endswith("}"):
            content = content[:-1] + "\n" * config.pad_whitespace + "}"
        if kind == "pad":
            content, finish = padded(chat.completion_budget)[0], "length"
            choices = []  # no label in it: every token is a nearly certain newline
        elif kind == "label_outside":
            content = self._labels.content(chat.response_format, chat.text, outside=True)
        elif kind in SPOILERS:
            content, finish, refusal = spoil(kind or "", content or "")
        completion = padded(chat.completion_budget)[1] if kind == "pad" else completion_tokens(content)
        budget, reasoning = chat.completion_budget, config.reasoning_tokens
        reasoning = min(reasoning, max(0, budget - completion)) if budget is not None else reasoning
        top = chat.top_logprobs if config.logprobs == "full" and content else None
        logprobs = None if top is None else token_logprobs(content or "", choices, top)
        if logprobs is not None and config.server == "vllm":
            # vLLM lists the stop token it sampled, though the text leaves it out.
            logprobs.append(stop_token(VLLM_STOP_TOKEN, top or 0))
        payload = completion_body(
            completion_id,
            chat.model,
            content,
            finish_reason=finish,
            refusal=refusal,
            prompt_tokens=chat.prompt_tokens,
            completion_tokens=completion + reasoning,
            cached_tokens=self._cache.cached_tokens(chat.model, chat.messages),
            reasoning_tokens=reasoning,
            logprobs=logprobs,
            service_tier=served_tier(chat.service_tier),
        )
        return payload, completion + reasoning
