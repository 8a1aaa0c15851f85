"""Extra typed output fields: what a task file declares in `[outputs.NAME]`, and validation of the values.

Each field is a small JSON schema (a string, integer, number or boolean, or an array of one of those, with
the usual bounds). It is asked for in the same structured output as the label, checked here when a reply
comes back, and written as a typed column in both sinks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pipeline.errors import ConfigError

_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KINDS: Final = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}
_COMMON: Final = {"type", "description", "enum"}
_KEYS: Final = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "array": {"items", "minItems", "maxItems"},
}


class OutputValueError(ValueError):
    """A reply's value for an extra output field breaks the field's schema."""


@dataclass(frozen=True, slots=True)
class OutputField:
    """One extra output field: its name, its JSON schema as declared, and the column kind it is stored as."""

    name: str
    schema: Mapping[str, Any]

    @property
    def kind(self) -> str:
        """The logical column kind (see `results.OUTPUT_KINDS`): "float64", or "list:string" for an array."""
        if self.schema["type"] == "array":
            return "list:" + _KINDS[self.schema["items"]["type"]]
        return _KINDS[self.schema["type"]]

    def hint(self) -> str:
        """How the prompt describes the field's value, e.g. `<number from 0 to 1: how sure>`."""
        schema = self.schema
        kind = schema["type"] if schema["type"] != "array" else f"array of {schema['items']['type']}s"
        if "enum" in schema:
            kind = "one of " + ", ".join(map(str, schema["enum"]))
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            kind += f" from {low:g} to {high:g}"
        description = schema.get("description")
        return f"<{kind}: {description}>" if description else f"<{kind}>"

    def check(self, value: Any) -> Any:
        """Return `value` if it fits the schema (ints accepted as numbers), else raise OutputValueError."""
        return _check(self.schema, value, self.name)


def parse_outputs(raw: Any, *, reserved: frozenset[str], where: str) -> tuple[OutputField, ...]:
    """Validate the `[outputs]` table of a task file: one JSON-schema property per extra field."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f'{where}: [outputs] must hold one table per field, like [outputs.reason] type = "string".')
    fields = []
    for name, schema in raw.items():
        at = f"{where}: [outputs.{name}]"
        if not _NAME.match(name):
            raise ConfigError(f"{at}: a field name must be letters, digits and _ (not starting with a digit).")
        if name in reserved or name in {"label", "labels"}:
            raise ConfigError(f"{at}: {name!r} is already a column of every record; choose another name.")
        fields.append(OutputField(name=name, schema=_schema(schema, at, top=True)))
    return tuple(fields)


def _schema(schema: Any, at: str, *, top: bool) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise ConfigError(f'{at} must be a table with at least type = "string", "integer", "number" or "boolean".')
    kind = schema.get("type")
    allowed = set(_KINDS) | ({"array"} if top else set())
    if kind not in allowed:
        what = ", ".join(sorted(allowed))
        raise ConfigError(
            f"{at}: type must be one of {what} (objects are not supported: use flat fields), got {kind!r}."
        )
    if unknown := sorted(set(schema) - _COMMON - _KEYS[kind]):
        raise ConfigError(
            f"{at}: key {unknown[0]!r} does not apply to type {kind!r}; allowed: {sorted(_COMMON | _KEYS[kind])}."
        )
    out = dict(schema)
    if kind == "array":
        out["items"] = _schema(schema.get("items"), f"{at} items", top=False)
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{at}: enum must be a non-empty list of values.")
        for value in values:
            try:
                _check({k: v for k, v in out.items() if k != "enum"}, value, "enum")
            except OutputValueError:
                raise ConfigError(f"{at}: enum value {value!r} is not a {kind}.") from None
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], int | float)):
            raise ConfigError(f"{at}: {key} must be a number, got {schema[key]!r}.")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], int) or schema[key] < 0):
            raise ConfigError(f"{at}: {key} must be a whole number ≥ 0, got {schema[key]!r}.")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{at}: pattern is not a regular expression: {exc}") from None
    return out


def _check(schema: Mapping[str, Any], value: Any, name: str) -> Any:
    kind = schema["type"]
    bad = OutputValueError(f"{name!r} must be a {kind} per the task's [outputs], got {str(value)[:60]!r}")
    if kind == "string":
        if not isinstance(value, str):
            raise bad
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            raise OutputValueError(f"{name!r} has {len(value)} characters, outside the task's length bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise OutputValueError(f"{name!r} does not match the pattern {schema['pattern']!r}: {value[:60]!r}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise bad
    elif kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        if kind == "integer" and value != int(value):
            raise bad
        value = int(value) if kind == "integer" else float(value)
        if (
            value < schema.get("minimum", -math.inf)
            or value > schema.get("maximum", math.inf)
            or value <= schema.get("exclusiveMinimum", -math.inf)
            or value >= schema.get("exclusiveMaximum", math.inf)
        ):
            raise OutputValueError(f"{name!r} = {value!r} is outside the task's bounds")
    elif kind == "array":
        if not isinstance(value, list):
            raise bad
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            raise OutputValueError(f"{name!r} has {len(value)} items, outside the task's bounds")
        value = [_check(schema["items"], item, name) for item in value]
    if "enum" in schema and value not in schema["enum"]:
        raise OutputValueError(f"{name!r} = {str(value)[:60]!r} is not one of {schema['enum']}")
    return value
