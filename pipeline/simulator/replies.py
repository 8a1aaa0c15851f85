"""Deterministic replies for the simulator: an instance of the requested JSON schema, chosen by a hash."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

DEFAULT_LABELS: Final = ("positive", "negative", "neutral")
OUTSIDE_LABEL: Final = "not_a_label"
_FINGERPRINT: Final = "fp_5b1ee9e4d1"

# Deep enough for any label schema; stops recursive `$ref`s from building forever.
_MAX_DEPTH: Final = 12
_SCHEMA_CACHE_SIZE: Final = 256
# Replies stay small even when a schema demands huge strings or arrays it cannot really mean.
_MAX_LENGTH: Final = 256
_STRING_FORMATS: Final = {
    "date": "2024-01-01",
    "date-time": "2024-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


class Draw:
    """Choices derived from a hash of one text, so the same text always gets the same choices."""

    __slots__ = ("_digest", "_pool")

    def __init__(self, text: str) -> None:
        self._digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=32).digest()
        self._pool = int.from_bytes(self._digest)

    def pick(self, n: int) -> int:
        """Return a number in range(n)."""
        if n <= 1:
            return 0
        if self._pool < n * n:
            # Too few bits left for an even spread: stretch the hash.
            self._digest = hashlib.blake2b(self._digest, digest_size=32).digest()
            self._pool = int.from_bytes(self._digest)
        self._pool, chosen = divmod(self._pool, n)
        return chosen


Generator = Callable[[Draw], Any]


def _const(value: Any) -> Generator:
    return lambda _draw: value


def _outside(values: list[Any]) -> Any:
    label = OUTSIDE_LABEL
    while label in values:
        label += "_"
    return label


class _Compiler:
    """Turns a JSON schema into a generator once, so replies never walk the schema."""

    def __init__(self, root: Mapping[str, Any], *, outside: bool) -> None:
        self._root = root
        self._outside = outside
        self._refs: dict[tuple[str, int], Generator] = {}

    def build(self, node: Any, depth: int) -> Generator:
        if not isinstance(node, Mapping) or depth > _MAX_DEPTH:
            return _const(None)
        if isinstance(ref := node.get("$ref"), str):
            return self._ref(ref, depth)
        if "const" in node:
            return _const(node["const"])
        if isinstance(values := node.get("enum"), list) and values:
            return self._enum(values)
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(branches := node.get(key), list) and branches:
                # A real model may take any branch; the first non-null one keeps replies predictable.
                branch = next((b for b in branches if _type_of(b) != "null"), branches[0])
                return self.build(branch, depth + 1)
        kind = _type_of(node)
        if kind == "object":
            return self._object(node, depth)
        if kind == "array":
            return self._array(node, depth)
        if kind == "string":
            return _string(node)
        if kind == "integer":
            return _integer(node)
        if kind == "number":
            return _number(node)
        if kind == "boolean":
            return lambda draw: draw.pick(2) == 1
        return _const(None)

    def resolve(self, node: Any) -> Any:
        """Follow local `$ref`s until a schema that is not a reference."""
        for _ in range(_MAX_DEPTH):
            if not (isinstance(node, Mapping) and isinstance(ref := node.get("$ref"), str)):
                return node
            node = self._pointer(ref)
        return None

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node: Any = self._root
        for part in ref[1:].split("/")[1:]:
            key = part.replace("~1", "/").replace("~0", "~")
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    def _ref(self, ref: str, depth: int) -> Generator:
        key = (ref, depth)
        if key not in self._refs:
            self._refs[key] = self.build(self._pointer(ref), depth + 1)
        return self._refs[key]

    def _enum(self, values: list[Any]) -> Generator:
        if self._outside:
            return _const(_outside(values))
        return lambda draw: values[draw.pick(len(values))]

    def _object(self, node: Mapping[str, Any], depth: int) -> Generator:
        props = node.get("properties")
        fields = (
            [(name, self.build(sub, depth + 1)) for name, sub in props.items()] if isinstance(props, Mapping) else []
        )
        return lambda draw: {name: gen(draw) for name, gen in fields}

    def _array(self, node: Mapping[str, Any], depth: int) -> Generator:
        low = max(0, int(node.get("minItems", 0)))
        high = node.get("maxItems")
        items = self.resolve(node.get("items"))
        values = items.get("enum") if isinstance(items, Mapping) else None
        if isinstance(values, list) and values:
            return self._enum_array(values, low, high)
        item = self.build(node.get("items"), depth + 1)
        # One item near the top, none deeper down, so recursive schemas end.
        count = min(max(low, 1 if depth < 4 else 0), _MAX_LENGTH)
        if isinstance(high, int):
            count = min(count, high)
        return lambda draw: [item(draw) for _ in range(count)]

    def _enum_array(self, values: list[Any], low: int, high: Any) -> Generator:
        # Multi-label answers: 1-2 distinct labels unless the schema demands otherwise.
        low = min(max(low, 1), len(values))
        top = min(high if isinstance(high, int) else 2, len(values))
        top = max(low, top)
        outside = _outside(values) if self._outside else None

        def generate(draw: Draw) -> list[Any]:
            count = low + draw.pick(top - low + 1)
            pool = list(range(len(values)))
            chosen = sorted(pool.pop(draw.pick(len(pool))) for _ in range(count))
            labels = [values[i] for i in chosen]
            if outside is not None:
                labels[0] = outside
            return labels

        return generate


def _type_of(node: Any) -> str | None:
    if not isinstance(node, Mapping):
        return None
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and "properties" in node:
        return "object"
    return kind if isinstance(kind, str) else None


def _string(node: Mapping[str, Any]) -> Generator:
    text = _STRING_FORMATS.get(str(node.get("format")), "text")
    low, high = node.get("minLength"), node.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = text.ljust(min(low, _MAX_LENGTH), "x")
    if isinstance(high, int):
        text = text[:high]
    return _const(text)


def _integer(node: Mapping[str, Any]) -> Generator:
    low = node.get("minimum", node.get("exclusiveMinimum", -1) + 1)
    high = node.get("maximum", node.get("exclusiveMaximum", low + 10) - 1)
    low, high = int(low), max(int(low), int(high))
    return lambda draw: low + draw.pick(high - low + 1)


def _number(node: Mapping[str, Any]) -> Generator:
    low = float(node.get("minimum", node.get("exclusiveMinimum", 0.0)))
    high = float(node.get("maximum", node.get("exclusiveMaximum", low + 1.0)))
    # Exclusive bounds: keep the steps strictly inside.
    first, last = (1, 99) if "exclusiveMinimum" in node or "exclusiveMaximum" in node else (0, 100)
    return lambda draw: min(high, max(low, low + (high - low) * (first + draw.pick(last - first + 1)) / 100))


def compile_schema(schema: Mapping[str, Any], *, outside: bool = False) -> Generator:
    """Compile `schema` into a generator of instances; `outside` puts a non-member in every enum."""
    return _Compiler(schema, outside=outside).build(schema, 0)


def _default_label(draw: Draw) -> dict[str, str]:
    return {"label": DEFAULT_LABELS[draw.pick(len(DEFAULT_LABELS))]}


def _default_outside(_draw: Draw) -> dict[str, str]:
    return {"label": OUTSIDE_LABEL}


class LabelMaker:
    """Reply contents honouring `response_format`, with compiled schemas cached by their bytes."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[bytes, tuple[Generator, Generator]] = {}

    def _generators(self, response_format: Any) -> tuple[Generator, Generator]:
        schema = None
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            return _default_label, _default_outside
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        pair = self._cache.get(key)
        if pair is None:
            if len(self._cache) >= _SCHEMA_CACHE_SIZE:
                self._cache.clear()
            try:
                pair = (compile_schema(schema), compile_schema(schema, outside=True))
            except (TypeError, ValueError, ArithmeticError):
                # A schema too broken to follow (e.g. "minItems": "x"): answer like json_object rather than fail.
                pair = (_default_label, _default_outside)
            self._cache[key] = pair
        return pair

    def content(self, response_format: Any, text: str, *, outside: bool = False) -> str:
        """The reply for a request whose last user message is `text`, as compact JSON."""
        normal, off_label = self._generators(response_format)
        value = (off_label if outside else normal)(Draw(text))
        return orjson.dumps(value).decode()


def read_messages(messages: list[Any]) -> tuple[int, str] | None:
    """Estimate prompt tokens and find the last user text; None if a message is malformed.

    The estimate is ceil(chars / 4) over all contents plus 3 per message.
    """
    chars = 0
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
        chars += len(content)
        if message.get("role") == "user":
            last_user = content
    return -(-chars // 4) + 3 * len(messages), last_user


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


def completion_body(
    completion_id: str,
    model: str,
    content: str | None,
    *,
    finish_reason: str = "stop",
    refusal: str | None = None,
    prompt_tokens: int,
    completion_tokens: int,
    service_tier: str = "default",
) -> bytes:
    """A `chat.completion` object as the real API sends it."""
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
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": service_tier,
            "system_fingerprint": _FINGERPRINT,
        }
    )
