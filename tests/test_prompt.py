"""Requests ask for structured output with the label enum; replies are validated against the label set."""

from __future__ import annotations

import contextlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.task.config import parse_config
from pipeline.task.prompt import Prompt, ReplyError

LABELS = {"positive": "good", "negative": "bad", "neutral": "neither"}
SINGLE = Prompt(
    parse_config({"instructions": "Judge it.", "labels": LABELS, "examples": [{"text": "ok", "label": "neutral"}]})
)
MULTI = Prompt(parse_config({"instructions": "Topics.", "labels": LABELS, "multi_label": True}))


def choice(content: str | None, finish: str = "stop", refusal: str | None = None) -> dict[str, object]:
    return {
        "index": 0,
        "message": {"role": "assistant", "content": content, "refusal": refusal},
        "finish_reason": finish,
    }


def test_request_carries_the_label_enum_and_the_examples() -> None:
    """response_format is a strict JSON schema whose enum is the label set; examples become message pairs."""
    schema = SINGLE.response_format["json_schema"]["schema"]
    assert SINGLE.response_format["type"] == "json_schema"
    assert schema["properties"]["label"]["enum"] == ["positive", "negative", "neutral"]
    assert schema["required"] == ["label"]
    messages = SINGLE.messages("좋아요")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert orjson.loads(messages[2]["content"]) == {"label": "neutral"}
    assert messages[-1]["content"] == "좋아요"
    assert "- negative: bad" in messages[0]["content"]


def test_multi_label_schema_is_an_array_of_the_enum() -> None:
    """Multi-label tasks ask for a list of labels from the enum."""
    prop = MULTI.response_format["json_schema"]["schema"]["properties"]["labels"]
    assert prop == {"type": "array", "items": {"type": "string", "enum": ["positive", "negative", "neutral"]}}


@pytest.mark.parametrize(
    ("content", "label"),
    [
        ('{"label": "positive"}', "positive"),
        ('```json\n{"label": "negative"}\n```', "negative"),
        ('Sure! {"label": "neutral"} Hope this helps.', "neutral"),
        ('{"label": "Positive"}', "positive"),
        ("neutral", "neutral"),
        ('"negative".', "negative"),
    ],
)
def test_usable_replies_give_the_canonical_label(content: str, label: str) -> None:
    """Valid JSON, fenced JSON, JSON inside prose, other casing and a bare label all give the canonical label."""
    assert SINGLE.parse(choice(content)) == label


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (choice('{"label": "mixed"}'), "invalid_label"),
        (choice("{not json"), "invalid_json"),
        (choice('{"label": 3}'), "invalid_label"),
        (choice(""), "empty_reply"),
        (choice(None), "empty_reply"),
        (choice('{"label": "posi', finish="length"), "length"),
        (choice(None, finish="content_filter"), "content_filter"),
        (choice(None, refusal="I can't help with that."), "refusal"),
    ],
)
def test_unusable_replies_raise_with_a_kind(reply: dict[str, object], kind: str) -> None:
    """Every way a reply can be unusable raises ReplyError naming the kind (retried, then dead-lettered)."""
    with pytest.raises(ReplyError) as caught:
        SINGLE.parse(reply)
    assert caught.value.kind == kind


def test_multi_label_replies() -> None:
    """Multi-label replies keep order, drop repeats, and reject empty lists or unknown labels."""
    assert MULTI.parse(choice('{"labels": ["negative", "positive", "negative"]}')) == ["negative", "positive"]
    assert MULTI.parse(choice('{"labels": "neutral"}')) == ["neutral"]
    for bad in ('{"labels": []}', '{"labels": ["other"]}'):
        with pytest.raises(ReplyError):
            MULTI.parse(choice(bad))


@given(st.sampled_from(list(LABELS)), st.text(max_size=30).filter(lambda s: "{" not in s and "}" not in s))
def test_label_survives_any_prose_around_it(label: str, noise: str) -> None:
    """Whatever prose without braces surrounds the JSON object, the label is recovered exactly."""
    content = f"{noise}{orjson.dumps({'label': label}).decode()}{noise}"
    assert SINGLE.parse(choice(content)) == label


@given(st.text(max_size=40))
def test_parser_never_crashes(content: str) -> None:
    """Any reply text either gives a label from the set or raises ReplyError, nothing else."""
    with contextlib.suppress(ReplyError):
        assert SINGLE.parse(choice(content)) in LABELS
