"""Task files (TOML) → a validated, immutable TaskConfig with a fingerprint for the resume guard."""

from __future__ import annotations

import hashlib
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ConfigError
from pipeline.results import RECORD_FIELDS
from pipeline.task.outputs import OutputField, parse_outputs

DEFAULT_MODEL = "gpt-4o-mini"
# Fields every sink record carries; a carried input column may not shadow them.
RESERVED_FIELDS = frozenset(RECORD_FIELDS)
_TOP_KEYS = {"name", "description", "instructions", "multi_label", "input", "model", "labels", "examples", "outputs"}
_INPUT_KEYS = {"id_column", "text_column", "template", "carry", "max_chars"}
_MODEL_KEYS = {"name", "temperature", "max_tokens"}
_LABEL_NAME = re.compile(r"^\S(.*\S)?$")


@dataclass(frozen=True, slots=True)
class Example:
    """One few-shot example: an input text and the labels it should get."""

    text: str
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """What to label and how: columns, instructions, the label set and model defaults."""

    name: str
    instructions: str
    labels: tuple[str, ...]
    label_descriptions: tuple[str, ...]
    multi_label: bool = False
    id_column: str | None = "id"
    text_column: str = "text"
    template: str | None = None
    carry: tuple[str, ...] = ()
    max_chars: int = 16_000
    model: str = DEFAULT_MODEL
    temperature: float = 0.0
    max_tokens: int = 64
    examples: tuple[Example, ...] = ()
    outputs: tuple[OutputField, ...] = ()  # extra typed fields asked for beside the label ([outputs.NAME])
    source: str = "<inline>"

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The input columns the text is built from (the text column, or the template's fields)."""
        if self.template is None:
            return (self.text_column,)
        return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.template) if f))

    def prompt_fingerprint(self) -> str:
        """A short hash of everything that shapes the prompt except the model."""
        payload: dict[str, Any] = {
            "instructions": self.instructions,
            "labels": list(self.labels),
            "descriptions": list(self.label_descriptions),
            "multi_label": self.multi_label,
            "template": self.template,
            "text_column": self.text_column,
            "max_chars": self.max_chars,
            "temperature": self.temperature,
            "examples": [[e.text, list(e.labels)] for e in self.examples],
        }
        if self.outputs:  # only when declared, so fingerprints of tasks without outputs stay as they were
            payload["outputs"] = [[f.name, dict(f.schema)] for f in self.outputs]
        return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]

    def with_overrides(self, **changes: Any) -> TaskConfig:
        """Return a copy with some fields replaced (used for CLI overrides such as --model)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update({k: v for k, v in changes.items() if v is not None})
        return TaskConfig(**fields)


def load_config(path: str | Path) -> TaskConfig:
    """Read and validate a task file; every problem names the key and what is allowed."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found. Pass --config with a task file, e.g. configs/sentiment.toml."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Mapping[str, Any], *, source: str = "<inline>") -> TaskConfig:
    """Validate an already-parsed task table (see configs/sentiment.toml for the format)."""
    where = source
    _no_unknown(raw, _TOP_KEYS, where, "top level")
    inp = _table(raw, "input", where)
    model = _table(raw, "model", where)
    _no_unknown(inp, _INPUT_KEYS, where, "[input]")
    _no_unknown(model, _MODEL_KEYS, where, "[model]")

    labels, descriptions = _parse_labels(raw.get("labels"), where)
    instructions = _string(raw, "instructions", where, required=True) or ""
    multi_label = _bool(raw, "multi_label", where, default=False)
    template = _string(inp, "template", where)
    text_column = _string(inp, "text_column", where) or "text"
    id_column = _string(inp, "id_column", where, default="id")
    carry = _string_list(inp, "carry", where)
    for column in carry:
        if column in RESERVED_FIELDS:
            raise ConfigError(
                f"{where}: [input] carry column {column!r} clashes with an output field; "
                f"reserved names are {sorted(RESERVED_FIELDS)}."
            )
    max_chars = _int(inp, "max_chars", where, default=16_000, minimum=1)
    if template is not None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"{where}: [input] template is not a valid format string: {exc}") from None
        if not fields or any(f == "" or f.isdigit() for f in fields):
            raise ConfigError(
                f'{where}: [input] template must name its columns, like "{{title}}\\n\\n{{body}}"; '
                "positional fields such as {} or {0} are not allowed."
            )

    examples = _parse_examples(raw.get("examples", []), labels, multi_label, where)
    outputs = parse_outputs(raw.get("outputs"), reserved=RESERVED_FIELDS | set(carry), where=where)

    temperature = model.get("temperature", 0.0)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ConfigError(f"{where}: [model] temperature must be a number from 0 to 2, got {temperature!r}.")
    return TaskConfig(
        name=_string(raw, "name", where) or Path(source).stem,
        instructions=instructions.strip(),
        labels=tuple(labels),
        label_descriptions=tuple(descriptions),
        multi_label=multi_label,
        id_column=id_column or None,
        text_column=text_column,
        template=template,
        carry=tuple(carry),
        max_chars=max_chars,
        model=_string(model, "name", where) or DEFAULT_MODEL,
        temperature=float(temperature),
        max_tokens=_int(model, "max_tokens", where, default=64, minimum=1),
        examples=examples,
        outputs=outputs,
        source=source,
    )


def _parse_labels(labels_raw: Any, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(labels_raw, Mapping) or not labels_raw:
        raise ConfigError(
            f'{where}: [labels] must be a table of label = "one-line description", with at least two labels.'
        )
    labels: list[str] = []
    descriptions: list[str] = []
    for name, desc in labels_raw.items():
        if not _LABEL_NAME.match(name):
            raise ConfigError(f"{where}: label {name!r} must be non-empty without leading/trailing spaces.")
        if not isinstance(desc, str) or not desc.strip():
            raise ConfigError(f"{where}: [labels] {name!r} needs a one-line description string.")
        labels.append(name)
        descriptions.append(desc.strip())
    if len(labels) < 2:
        raise ConfigError(f"{where}: [labels] has only {labels!r}; a classifier needs at least two labels.")
    folded = [label.casefold() for label in labels]
    if len(set(folded)) != len(folded):
        raise ConfigError(f"{where}: [labels] has names that differ only in case: {labels!r}.")
    return labels, descriptions


def _parse_examples(raw_examples: Any, labels: list[str], multi_label: bool, where: str) -> tuple[Example, ...]:
    if not isinstance(raw_examples, list):
        raise ConfigError(f"{where}: examples must be an array of tables ([[examples]]).")
    examples = []
    for i, ex in enumerate(raw_examples, 1):
        if not isinstance(ex, Mapping) or not isinstance(ex.get("text"), str):
            raise ConfigError(f'{where}: [[examples]] #{i} needs text = "..." and label = "...".')
        got = ex.get("labels", ex.get("label"))
        ex_labels = (got,) if isinstance(got, str) else tuple(got) if isinstance(got, list) else ()
        unknown = [x for x in ex_labels if x not in labels]
        if not ex_labels or unknown:
            raise ConfigError(f"{where}: [[examples]] #{i} has label {got!r}; allowed labels are {labels!r}.")
        if len(ex_labels) > 1 and not multi_label:
            raise ConfigError(f"{where}: [[examples]] #{i} has several labels but multi_label is false.")
        examples.append(Example(text=ex["text"], labels=ex_labels))
    return tuple(examples)


def _no_unknown(table: Mapping[str, Any], allowed: set[str], where: str, section: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in {section}; allowed keys are {sorted(allowed)}.")


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key} must be a table ([{key}]), got {type(value).__name__}.")
    return value


def _string(
    raw: Mapping[str, Any], key: str, where: str, *, required: bool = False, default: str | None = None
) -> str | None:
    value = raw.get(key, default)
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing required key {key!r} (a string).")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ConfigError(f"{where}: {key!r} must be a non-empty string, got {value!r}.")
    return value


def _bool(raw: Mapping[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}.")
    return value


def _int(raw: Mapping[str, Any], key: str, where: str, *, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: {key!r} must be an integer ≥ {minimum}, got {value!r}.")
    return value


def _string_list(raw: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of column names, got {value!r}.")
    return list(value)
