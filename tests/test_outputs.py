"""Extra typed output fields: declared in the task file, asked for in the structured output, validated, stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from pipeline.errors import ConfigError, SinkMismatchError
from pipeline.sinks import open_sink
from pipeline.task.config import parse_config
from pipeline.task.prompt import Prompt, ReplyError

from .helpers import dead_letters, label, reviews, write_csv

BASE: dict[str, Any] = {
    "instructions": "Label the sentiment.",
    "labels": {"positive": "pleased", "negative": "unhappy", "neutral": "neither"},
    "input": {"carry": ["lang"]},
}
OUTPUTS = {
    "reason": {"type": "string", "description": "one short sentence", "maxLength": 200},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    "urgent": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["price", "quality", "delivery"]}, "maxItems": 2},
}


def task(**outputs: Any) -> Any:
    return parse_config({**BASE, "outputs": outputs or OUTPUTS})


def test_outputs_join_the_structured_output_after_the_label() -> None:
    """Each declared field is a required property of the response_format schema, after the label, and the
    system prompt names it with its type and description."""
    prompt = Prompt(task())
    schema = prompt.response_format["json_schema"]["schema"]
    assert list(schema["properties"]) == ["label", "reason", "score", "stars", "urgent", "tags"]
    assert schema["required"] == list(schema["properties"])
    assert schema["properties"]["score"] == OUTPUTS["score"]
    assert '"reason": <string: one short sentence>' in prompt.prefix[0]["content"]
    assert '"score": <number from 0 to 1>' in prompt.prefix[0]["content"]
    assert task().prompt_fingerprint() != parse_config(BASE).prompt_fingerprint()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"lang": {"type": "string"}}, "already a column"),
        ({"confidence": {"type": "number"}}, "already a column"),
        ({"why": {"type": "object"}}, "objects are not supported"),
        ({"why": {"type": "string", "minimum": 1}}, "does not apply to type 'string'"),
        ({"why": {"type": "string", "enum": [1]}}, "is not a string"),
        ({"9lives": {"type": "string"}}, "letters, digits"),
        ({"why": {"type": "string", "pattern": "("}}, "not a regular expression"),
    ],
)
def test_bad_output_declarations_name_the_field(outputs: dict[str, Any], message: str) -> None:
    """A field that clashes with a column, uses an unsupported type or a keyword of another type is refused."""
    with pytest.raises(ConfigError, match=message):
        task(**outputs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"label": "positive", "score": 0.5}', "lacks the field 'reason'"),
        ('{"label": "positive", "reason": "ok", "score": 1.5}', "outside the task's bounds"),
        ('{"label": "positive", "reason": 3, "score": 0.5}', "must be a string"),
        ('{"label": "positive", "reason": "ok", "score": true}', "must be a number"),
    ],
)
def test_replies_with_bad_output_values_are_unusable(content: str, message: str) -> None:
    """A missing field or a value outside its schema is an invalid_output reply (retried, then dead-lettered)."""
    prompt = Prompt(task(reason=OUTPUTS["reason"], score=OUTPUTS["score"]))
    with pytest.raises(ReplyError, match=message) as caught:
        prompt.parse_content(content)
    assert caught.value.kind == "invalid_output"
    ok = prompt.read_content('{"label": "positive", "reason": "ok", "score": 1}')
    assert ok.extras == {"reason": "ok", "score": 1.0}


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_outputs_are_typed_columns_in_both_sinks(sim: Any, tmp_path: Path, name: str) -> None:
    """Over HTTP, every record carries each field with its type: string, float, int, bool, list of strings."""
    source = write_csv(tmp_path / "in.csv", reviews(20))
    out = tmp_path / name
    summary = label(sim, source, out, config=task())
    assert (summary.labeled, summary.failed) == (20, 0), dead_letters(out)
    records = list(open_sink(out).iter_records())
    assert list(records[0])[:8] == ["id", "label", "confidence", "reason", "score", "stars", "urgent", "tags"]
    for r in records:
        assert isinstance(r["reason"], str) and len(r["reason"]) <= 200
        assert isinstance(r["score"], float) and 0 <= r["score"] <= 1
        assert isinstance(r["stars"], int) and 1 <= r["stars"] <= 5
        assert isinstance(r["urgent"], bool)
        assert isinstance(r["tags"], list) and set(r["tags"]) <= {"price", "quality", "delivery"}
    if name.endswith(".parquet"):
        schema = ds.dataset(out).schema
        types = {f: str(schema.field(f).type) for f in ("reason", "score", "stars", "urgent", "tags")}
        assert types == {
            "reason": "string", "score": "double", "stars": "int64", "urgent": "bool", "tags": "list<element: string>"
        }  # fmt: skip
    else:
        assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["lang"] in {"ko", "en"}


def test_changing_the_outputs_of_a_sink_is_refused(sim: Any, tmp_path: Path) -> None:
    """Resuming a sink with other output fields is refused: they are part of the prompt the guard compares."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    out = tmp_path / "out.parquet"
    label(sim, source, out, config=task(score=OUTPUTS["score"]), max_rows=5)
    with pytest.raises(SinkMismatchError, match="prompt"):  # the resume guard names the changed prompt
        label(sim, source, out, config=task(stars=OUTPUTS["stars"]))
