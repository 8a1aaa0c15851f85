"""The chat messages and `response_format` for a task, and validation of the model's reply."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.task.config import TaskConfig
from pipeline.task.outputs import OutputValueError

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class ReplyError(Exception):
    """The model answered, but not with a usable label; `kind` names how (retried, then dead-lettered)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # What the unusable reply cost by its `usage` (set by `read_reply`): it is billed like a good one.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """A validated reply: the label (or labels), the extra output fields, and the content they were read from."""

    label: str | list[str]
    extras: dict[str, Any] = field(default_factory=dict)
    content: str = ""


class Prompt:
    """Builds requests for one task and checks replies against its label set."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.field = "labels" if config.multi_label else "label"
        self._canonical = {label.casefold(): label for label in config.labels}
        self._prefix = self._prefix_messages()
        self.response_format = self._response_format()

    def messages(self, text: str) -> list[dict[str, str]]:
        """The full message list for one input text (the shared prefix is built once)."""
        return [*self._prefix, {"role": "user", "content": text}]

    @property
    def prefix(self) -> list[dict[str, str]]:
        """The system prompt and examples: the part every request shares."""
        return self._prefix

    def parse(self, choice: Mapping[str, Any]) -> str | list[str]:
        """Return the label (or labels) from one `choices[i]` object, or raise ReplyError."""
        return self.parse_answer(choice).label

    def parse_answer(self, choice: Mapping[str, Any]) -> Answer:
        """Return the label (or labels) and the extra output fields from one `choices[i]` object, or raise
        ReplyError."""
        message = choice.get("message") or {}
        finish = choice.get("finish_reason")
        if message.get("refusal"):
            raise ReplyError("refusal", f"the model refused: {str(message['refusal'])[:200]}")
        if finish == "content_filter":
            raise ReplyError("content_filter", "the reply was withheld by the provider's content filter")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            kind = "length" if finish == "length" else "empty_reply"
            raise ReplyError(kind, f"the reply has no content (finish_reason={finish!r})")
        try:
            return self.read_content(content)
        except ReplyError as exc:
            if finish == "length":
                raise ReplyError("length", f"the reply was cut off at max_tokens: {exc.message}") from None
            raise

    def parse_content(self, content: str) -> str | list[str]:
        """Validate a reply text: JSON with the label field (fences or prose around it are tolerated)."""
        return self.read_content(content).label

    def read_content(self, content: str) -> Answer:
        """Validate a reply text and read the label and the extra output fields from it."""
        value = _load_json_object(content.strip())
        if value is None:
            # Models without structured output sometimes answer with the bare label.
            bare = self._canonical.get(content.strip().strip("\"'.").casefold())
            if bare is not None and not self.config.outputs:
                return Answer([bare] if self.config.multi_label else bare, content=content)
            raise ReplyError("invalid_json", f"the reply is not JSON: {content[:120]!r}")
        return Answer(self._label_of(value), self._extras_of(value), content)

    def _extras_of(self, value: Mapping[str, Any]) -> dict[str, Any]:
        extras = {}
        for output in self.config.outputs:
            if output.name not in value:
                raise ReplyError("invalid_output", f"the reply lacks the field {output.name!r}")
            try:
                extras[output.name] = output.check(value[output.name])
            except OutputValueError as exc:
                raise ReplyError("invalid_output", str(exc)) from None
        return extras

    def _label_of(self, value: Mapping[str, Any]) -> str | list[str]:
        got = value.get(self.field, value.get("label" if self.config.multi_label else "labels"))
        if self.config.multi_label:
            items = [got] if isinstance(got, str) else got
            if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
                raise ReplyError("invalid_label", f"expected {self.field!r}: a non-empty list, got {got!r}")
            labels = [self._label(x) for x in items]
            return list(dict.fromkeys(labels))
        if not isinstance(got, str):
            raise ReplyError("invalid_label", f"expected {self.field!r}: one of the labels, got {got!r}")
        return self._label(got)

    def _label(self, value: str) -> str:
        label = self._canonical.get(value.strip().casefold())
        if label is None:
            raise ReplyError("invalid_label", f"label {value[:60]!r} is not one of {list(self.config.labels)}")
        return label

    def _prefix_messages(self) -> list[dict[str, str]]:
        cfg = self.config
        catalogue = "\n".join(f"- {n}: {d}" for n, d in zip(cfg.labels, cfg.label_descriptions, strict=True))
        shape = "[<every label that applies, at least one>]" if cfg.multi_label else '"<exactly one label>"'
        fields = "".join(f', "{f.name}": {f.hint()}' for f in cfg.outputs)
        answer = f'Answer with JSON only: {{"{self.field}": {shape}{fields}}}.'
        system = f"{cfg.instructions}\n\nLabels:\n{catalogue}\n\n{answer}"
        messages = [{"role": "system", "content": system}]
        for ex in cfg.examples:
            value: str | list[str] = list(ex.labels) if cfg.multi_label else ex.labels[0]
            messages.append({"role": "user", "content": ex.text})
            messages.append({"role": "assistant", "content": orjson.dumps({self.field: value}).decode()})
        return messages

    def _response_format(self) -> dict[str, Any]:
        enum = {"type": "string", "enum": list(self.config.labels)}
        prop: dict[str, Any] = {"type": "array", "items": enum} if self.config.multi_label else enum
        return {
            "type": "json_schema",
            "json_schema": {
                "name": "labels" if self.config.multi_label else "label",
                "strict": True,
                "schema": {
                    "type": "object",
                    # The label first: the model decides it before writing anything else.
                    "properties": {self.field: prop, **{f.name: dict(f.schema) for f in self.config.outputs}},
                    "required": [self.field, *(f.name for f in self.config.outputs)],
                    "additionalProperties": False,
                },
            },
        }


def _load_json_object(text: str) -> dict[str, Any] | None:
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        # Prose around one JSON object ("Sure! {...} Hope this helps"): take the outermost braces.
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            return None
        try:
            value = orjson.loads(text[start : end + 1])
        except orjson.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None
