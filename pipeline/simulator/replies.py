"""Deterministic replies for the simulator: an instance of the requested JSON schema, chosen by a hash."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from pipeline.simulator.judge import probabilities

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


# What a reply chose among labels, for its logprobs: (value, probability, [(rival, probability), ...]).
Choice = tuple[str, float, list[tuple[str, float]]]


class Draw:
    """Choices derived from a hash of one text, so the same text always gets the same choices.

    With `scores` (label → score, from the judge) an enum of those labels takes the best-scored one (ties by
    the hash); every choice among string values is remembered in `choices` for the reply's logprobs.
    """

    __slots__ = ("_digest", "_pool", "choices", "scores")

    def __init__(self, text: str, scores: Mapping[str, float] | None = None) -> None:
        self._digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=32).digest()
        self._pool = int.from_bytes(self._digest)
        self.scores = scores
        self.choices: list[Choice] = []

    def choose(self, values: list[Any]) -> Any:
        """One of `values`: the best-scored, else by the hash."""
        probs = probabilities(self.scores or {}, values)
        best = max(probs)
        tied = [i for i, p in enumerate(probs) if p == best]
        chosen = tied[self.pick(len(tied))]
        self._remember(values, probs, [chosen])
        return values[chosen]

    def choose_some(self, values: list[Any], low: int, top: int) -> list[Any]:
        """Between `low` and `top` distinct values, in their order: those scored near the best, else by the hash."""
        if not self.scores:
            count = low + self.pick(top - low + 1)
            pool = list(range(len(values)))
            chosen = sorted(pool.pop(self.pick(len(pool))) for _ in range(count))
            self._remember(values, [1 / len(values)] * len(values), chosen)
            return [values[i] for i in chosen]
        probs = probabilities(self.scores, values)
        ranked = sorted(range(len(values)), key=lambda i: (-probs[i], i))
        best = probs[ranked[0]]
        count = max(low, min(top, sum(1 for p in probs if p >= 0.5 * best)))
        chosen = sorted(ranked[:count])
        self._remember(values, probs, chosen)
        return [values[i] for i in chosen]

    def _remember(self, values: list[Any], probs: list[float], chosen: list[int]) -> None:
        if not all(isinstance(v, str) for v in values):
            return
        for i in chosen:
            rivals = [(values[j], probs[j]) for j in range(len(values)) if j != i]
            self.choices.append((values[i], probs[i], rivals))

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
        return lambda draw: draw.choose(values)

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
            labels = draw.choose_some(values, low, top)
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
    return {"label": draw.choose(list(DEFAULT_LABELS))}


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

    def content(
        self, response_format: Any, text: str, *, outside: bool = False, scores: Mapping[str, float] | None = None
    ) -> str:
        """The reply for a request whose last user message is `text`, as compact JSON."""
        return self.answer(response_format, text, outside=outside, scores=scores)[0]

    def answer(
        self, response_format: Any, text: str, *, outside: bool = False, scores: Mapping[str, float] | None = None
    ) -> tuple[str, list[Choice]]:
        """The reply content as compact JSON, and the label choices made in it (for logprobs)."""
        normal, off_label = self._generators(response_format)
        draw = Draw(text, scores)
        value = (off_label if outside else normal)(draw)
        return orjson.dumps(value).decode(), draw.choices
