"""The OpenAI-compatible simulator: reply shapes, labels, limits, faults, stats and control."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai.types.chat import ChatCompletion
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pipeline.simulator import (
    DEFAULT_LABELS,
    MALFORMED_KINDS,
    RateWindow,
    Simulator,
    SimulatorConfig,
    SimulatorThread,
    format_duration,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"
EXTRACT = ROOT / "tests" / "data" / "openai_chat_schemas.json"
API = "urn:openai-openapi"
MODEL = "gpt-4o-mini"
LABELS = ["billing", "bug", "feature_request", "other"]
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


# --- helpers ---------------------------------------------------------------------------------


def label_format(labels: list[str], *, multi: bool = False, **array: int) -> dict[str, Any]:
    """A strict json_schema response_format asking for one label, or an array of them."""
    label: dict[str, Any] = {"type": "string", "enum": labels}
    if multi:
        label = {"type": "array", "items": label, **array}
    schema = {"type": "object", "properties": {"label": label}, "required": ["label"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}


def call(
    sim: SimulatorThread, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP exchange with the simulator: status, lower-cased headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def chat(sim: SimulatorThread, text: str, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    """POST a chat completion whose last user message is `text`."""
    messages = [{"role": "system", "content": "Label the message."}, {"role": "user", "content": text}]
    return call(sim, "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, **extra})


def content_of(body: bytes) -> Any:
    """The assistant message content of a completion body."""
    return json.loads(body)["choices"][0]["message"]["content"]


def label_of(body: bytes) -> Any:
    """The label inside a completion body's JSON content."""
    return json.loads(content_of(body))["label"]


def sdk(sim: SimulatorThread, transport: str = "httpx", **options: Any) -> AsyncOpenAI:
    """An unmodified AsyncOpenAI client for the simulator, on the httpx or aiohttp transport."""
    if transport == "aiohttp":
        options["http_client"] = DefaultAioHttpClient()
    options = {"api_key": "sk-test", "max_retries": 0, **options}
    return AsyncOpenAI(base_url=sim.base_url, **options)


async def ask(client: AsyncOpenAI, text: str, **extra: Any) -> ChatCompletion:
    """One chat completion through the SDK."""
    return await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **extra)


def with_sdk(sim: SimulatorThread, work: Callable[[AsyncOpenAI], Any], transport: str = "httpx", **opts: Any) -> Any:
    """Run `work(client)` on a fresh event loop and close the client afterwards."""

    async def main() -> Any:
        async with sdk(sim, transport, **opts) as client:
            return await work(client)

    return asyncio.run(main())


def _closed(node: Any, *, names: bool = False) -> Any:
    """The schema with unevaluatedProperties: false on every object, so a misspelt field fails too."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {key: _closed(value) for key, value in node.items()}
    out = {
        key: value if key in ("enum", "const", "default") else _closed(value, names=key in ("properties", "$defs"))
        for key, value in node.items()
    }
    if "properties" in node and "additionalProperties" not in node:
        out["unevaluatedProperties"] = False
    return out


@functools.cache
def _registry() -> Registry[Any]:
    # The full description when ../shared is there; the committed extract (same layout) on a clean clone.
    if SPEC.exists():
        with SPEC.open(encoding="utf-8") as handle:
            api = yaml.load(handle, Loader=yaml.CSafeLoader)
    else:
        api = json.loads(EXTRACT.read_text(encoding="utf-8"))
    return Registry().with_resource(API, Resource(contents=_closed(api), specification=DRAFT202012))


def check(instance: Any, pointer: str) -> None:
    """Validate `instance` against the API description's schema at `pointer` (raises ValidationError)."""
    validator = jsonschema.Draft202012Validator({"$ref": f"{API}#{pointer}"}, registry=_registry())
    validator.validate(instance)


COMPLETION = "/components/schemas/CreateChatCompletionResponse"
ERROR = "/components/schemas/ErrorResponse"
TOO_MANY = "/components/responses/TooManyRequests"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- shapes ----------------------------------------------------------------------------------


def test_sdk_parses_a_reply_with_a_label_from_the_enum(sim: SimulatorThread) -> None:
    """The unmodified AsyncOpenAI client parses a reply whose JSON content names a label from the enum."""
    completion = with_sdk(sim, lambda c: ask(c, "The invoice was charged twice", response_format=label_format(LABELS)))
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.message.role, choice.message.refusal) == ("stop", "assistant", None)
    assert json.loads(choice.message.content or "")["label"] in LABELS
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_sdk_aiohttp_transport_and_raw_response(sim: SimulatorThread) -> None:
    """Through the SDK's aiohttp transport, with_raw_response shows x-request-id and parses to a completion."""

    async def work(client: AsyncOpenAI) -> tuple[str, ChatCompletion]:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "it crashes"}], response_format=label_format(LABELS)
        )
        return raw.headers["x-request-id"], raw.parse()

    request_id, completion = with_sdk(sim, work, "aiohttp")
    assert request_id.startswith("req_")
    assert json.loads(completion.choices[0].message.content or "")["label"] in LABELS


@pytest.mark.parametrize(
    "response_format",
    [
        label_format(LABELS),
        label_format(LABELS, multi=True),
        {"type": "json_object"},
        None,
    ],
    ids=["json_schema", "multi_label", "json_object", "none"],
)
def test_success_body_matches_the_api_description(sim: SimulatorThread, response_format: Any) -> None:
    """A reply validates against CreateChatCompletionResponse, with no field the description lacks."""
    extra = {"response_format": response_format} if response_format else {}
    status, headers, body = chat(sim, "hello", **extra)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")
    check(json.loads(body), COMPLETION)


def test_without_a_schema_the_reply_is_a_default_label(sim: SimulatorThread) -> None:
    """With json_object or no response_format the content is {"label": ...} with a default label."""
    for extra in ({"response_format": {"type": "json_object"}}, {}):
        _, _, body = chat(sim, "fine, I guess", **extra)
        assert label_of(body) in DEFAULT_LABELS


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("object",), None),
        (("choices", 0, "finish_reason"), "done"),
        (("choices", 0, "message", "role"), "user"),
        (("choices", 0, "message", "refusal"), None),
        (("usage", "total_tokens"), "10"),
        (("choices", 0, "mesage"), {}),
    ],
    ids=["missing_object", "bad_finish_reason", "bad_role", "missing_refusal", "string_tokens", "misspelt_field"],
)
def test_schema_check_rejects_a_broken_completion(
    sim: SimulatorThread, path: tuple[str | int, ...], value: Any
) -> None:
    """The schema check is not vacuous: one field removed (None here), mistyped or misspelt fails it."""
    body = json.loads(chat(sim, "hello", response_format=label_format(LABELS))[2])
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        check(body, COMPLETION)


def test_schema_check_rejects_a_broken_error() -> None:
    """An error body without `code` or with a numeric `message` fails the ErrorResponse check."""
    good = {"error": {"message": "x", "type": "server_error", "param": None, "code": None}}
    check(good, ERROR)
    for broken in ({k: v for k, v in good["error"].items() if k != "code"}, {**good["error"], "message": 1}):
        with pytest.raises(jsonschema.ValidationError):
            check({"error": broken}, ERROR)


def test_models_list_matches_the_api_description(sim: SimulatorThread) -> None:
    """GET /v1/models validates as ListModelsResponse and lists the configured models through the SDK."""
    status, _, body = call(sim, "GET", "/v1/models")
    assert status == 200
    check(json.loads(body), "/components/schemas/ListModelsResponse")
    sim.configure(models=["gpt-4o-mini", "tiny"])

    async def ids(client: AsyncOpenAI) -> list[str]:
        return [model.id async for model in client.models.list()]

    assert with_sdk(sim, ids) == ["gpt-4o-mini", "tiny"]


@pytest.mark.skipif(not SPEC.exists(), reason="the OpenAPI description lives in ../shared, absent on a clean clone")
def test_committed_schema_extract_is_up_to_date() -> None:
    """tests/data/openai_chat_schemas.json is exactly what the extract script makes from the description."""
    script = ROOT / "scripts" / "extract_openapi_schemas.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- labels ----------------------------------------------------------------------------------


def test_same_text_same_label_and_texts_spread_over_labels(sim: SimulatorThread) -> None:
    """A label depends only on the last user message: repeats agree, a restart agrees, and texts spread."""
    texts = [f"ticket {i}: something happened" for i in range(40)]
    fmt = label_format(LABELS)
    first = [label_of(chat(sim, text, response_format=fmt)[2]) for text in texts]
    assert [label_of(chat(sim, text, response_format=fmt)[2]) for text in texts] == first
    with SimulatorThread(SimulatorConfig(latency_ms=0, seed=99)) as other:
        assert [label_of(chat(other, text, response_format=fmt)[2]) for text in texts] == first
    assert set(first) == set(LABELS)


@pytest.mark.parametrize(
    ("bounds", "sizes"),
    [({}, {1, 2}), ({"minItems": 2, "maxItems": 3}, {2, 3}), ({"minItems": 0, "maxItems": 1}, {1})],
    ids=["default", "min2_max3", "max1"],
)
def test_multi_label_arrays_hold_distinct_labels_within_bounds(
    sim: SimulatorThread, bounds: dict[str, int], sizes: set[int]
) -> None:
    """An array of an enum gets distinct labels, 1-2 of them by default, else within minItems/maxItems."""
    fmt = label_format(LABELS, multi=True, **bounds)
    seen = set()
    for i in range(30):
        labels = label_of(chat(sim, f"message {i}", response_format=fmt)[2])
        assert len(set(labels)) == len(labels)
        assert set(labels) <= set(LABELS)
        seen.add(len(labels))
    assert seen == sizes


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["a", "b"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "flags": {
                "type": "object",
                "properties": {"urgent": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
                "required": ["urgent", "note"],
                "additionalProperties": False,
            },
        },
        "required": ["label", "confidence", "stars", "reasons", "flags"],
        "additionalProperties": False,
    },
    "pydantic_refs": {
        "$defs": {
            "Topic": {"enum": ["sports", "politics", "tech"], "title": "Topic", "type": "string"},
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["name", "children"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "topic": {"$ref": "#/$defs/Topic"},
            "topics": {"type": "array", "items": {"$ref": "#/$defs/Topic"}},
            "maybe": {"anyOf": [{"$ref": "#/$defs/Topic"}, {"type": "null"}]},
            "tree": {"$ref": "#/$defs/Node"},
        },
        "required": ["topic", "topics", "maybe", "tree"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_reply_is_an_instance_of_the_requested_schema(sim: SimulatorThread, name: str) -> None:
    """Whatever strict JSON schema the request names (nested, $ref, recursive), the content validates against it."""
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
    for i in range(10):
        jsonschema.validate(json.loads(content_of(chat(sim, f"text {i}", response_format=fmt)[2])), schema)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
SCHEMA_WORDS = st.sampled_from(["type", "enum", "items", "properties", "minItems", "maxItems", "$ref", "anyOf"])
SCHEMA_LIKE = st.recursive(
    st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "#", "#/x"]) | JSON,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCHEMA_WORDS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None)
@given(schema=SCHEMA_LIKE)
def test_any_schema_gets_a_reply_never_a_server_error(simulator: SimulatorThread, schema: Any) -> None:
    """Whatever JSON arrives as a json_schema, the simulator answers 200 with JSON content, never a 5xx."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}
    status, _, body = chat(simulator, "text", response_format=fmt)
    assert status == 200
    json.loads(content_of(body))


# --- errors ----------------------------------------------------------------------------------


def _provoke(sim: SimulatorThread, case: str) -> tuple[int, dict[str, str], bytes]:
    if case == "bad_json":
        return call(sim, "POST", "/v1/chat/completions", b"{not json")
    if case == "no_messages":
        return call(sim, "POST", "/v1/chat/completions", {"model": MODEL})
    if case == "unknown_model":
        sim.configure(models=[MODEL])
        return call(
            sim, "POST", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
        )
    if case == "wrong_key":
        sim.configure(api_key="sk-right")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        return call(sim, "POST", "/v1/chat/completions", body, headers={"Authorization": "Bearer sk-wrong"})
    if case == "scripted_503":
        sim.script([{"kind": "status", "status": 503}])
        return chat(sim, "x")
    if case == "unknown_path":
        return call(sim, "GET", "/v1/nothing-here")
    if case == "stream":
        return chat(sim, "x", stream=True)
    sim.configure(rpm=1)
    chat(sim, "x")
    return chat(sim, "x")


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("bad_json", 400, None),
        ("no_messages", 400, "invalid_type"),
        ("unknown_model", 404, "model_not_found"),
        ("wrong_key", 401, "invalid_api_key"),
        ("scripted_503", 503, None),
        ("unknown_path", 404, None),
        ("stream", 400, "unsupported_value"),
        ("window_429", 429, "rate_limit_exceeded"),
    ],
)
def test_error_bodies_match_the_api_description(sim: SimulatorThread, case: str, status: int, code: str | None) -> None:
    """Every error is an ErrorResponse with the real status and code, and carries x-request-id."""
    got, headers, body = _provoke(sim, case)
    assert got == status
    error = json.loads(body)
    check(error, ERROR)
    assert error["error"]["code"] == code
    assert headers["x-request-id"].startswith("req_")


def test_wrong_or_missing_key_is_401_without_echoing_the_key(sim: SimulatorThread) -> None:
    """With api_key set, a wrong key gets 401 invalid_api_key without being echoed; the right key works."""
    sim.configure(api_key="sk-right-key-0123456789")

    async def work(client: AsyncOpenAI) -> openai.AuthenticationError:
        with pytest.raises(openai.AuthenticationError) as caught:
            await ask(client, "x")
        return caught.value

    error = with_sdk(sim, work, api_key="sk-wrong-key-0123456789")
    assert error.code == "invalid_api_key"
    assert "wrong-key" not in error.message
    assert with_sdk(sim, lambda c: ask(c, "x"), api_key="sk-right-key-0123456789").choices
    assert call(sim, "GET", "/v1/models")[0] == 401


def test_unknown_model_is_404_model_not_found(sim: SimulatorThread) -> None:
    """With models set, another model is NotFoundError model_not_found, which a client must not retry."""
    sim.configure(models=[MODEL])

    async def work(client: AsyncOpenAI) -> openai.NotFoundError:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-imaginary", messages=[{"role": "user", "content": "x"}])
        return caught.value

    assert with_sdk(sim, work).code == "model_not_found"


# --- rate limits -----------------------------------------------------------------------------


def test_window_refuses_when_full_and_frees_with_its_oldest_use() -> None:
    """A full window refuses without spending and admits again exactly when its oldest use is 60 s old."""
    clock = FakeClock()
    window = RateWindow(3, clock=clock)
    for _ in range(3):
        assert window.wait(1) == 0.0
        window.add(1)
        clock.advance(10)
    assert window.wait(1) == pytest.approx(30.0)
    assert (window.used(), window.remaining()) == (3, 0)
    clock.advance(29.999)
    assert window.wait(1) > 0
    clock.advance(0.001)
    assert window.wait(1) == 0.0
    assert window.remaining() == 1


def test_token_window_waits_until_enough_tokens_free() -> None:
    """A token window waits for as many old uses to expire as the new cost needs, and never fits an oversize cost."""
    clock = FakeClock()
    window = RateWindow(100, clock=clock)
    window.add(60)
    clock.advance(10)
    window.add(30)
    clock.advance(10)
    assert window.wait(10) == 0.0
    assert window.wait(50) == pytest.approx(40.0)  # the 60 spent at t=0 must go
    assert window.wait(75) == pytest.approx(50.0)  # both uses must go
    assert math.isinf(window.wait(101))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1.5, "1.5s"),
        (45, "45s"),
        (61.25, "1m1.25s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
    ],
)
def test_reset_durations_use_the_openai_format(seconds: float, text: str) -> None:
    """x-ratelimit-reset-* durations look like OpenAI's ("120ms", "1.5s", "6m0s"), rounded up to the millisecond."""
    assert format_duration(seconds) == text


def test_rpm_window_over_http_with_a_fake_clock() -> None:
    """Over the RPM limit: 429 with exact retry-after and x-ratelimit-* headers; a refused request still counts."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, rpm=2), clock=clock) as limited:
        status, headers, _ = chat(limited, "one")
        assert status == 200
        assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "1")
        clock.advance(10)
        status, headers, _ = chat(limited, "two")
        assert (status, headers["x-ratelimit-remaining-requests"], headers["x-ratelimit-reset-requests"]) == (
            200,
            "0",
            "50s",
        )
        clock.advance(5)
        status, headers, body = chat(limited, "three")
        assert status == 429
        # The refused request at 15 s counts too: room for one more comes when both 0 s and 10 s have expired.
        assert (headers["retry-after-ms"], headers["retry-after"], headers["x-ratelimit-reset-requests"]) == (
            "55000",
            "55",
            "55s",
        )
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "Limit 2, Used 2, Requested 1" in error["message"]
        clock.advance(54.999)
        status, headers, _ = chat(limited, "four")  # one millisecond early: refused, and that costs another 5 s
        assert (status, headers["retry-after-ms"]) == (429, "5001")
        clock.advance(5.001)
        assert chat(limited, "five")[0] == 200
        stats = limited.stats()
        assert stats["by_status"] == {"200": 3, "429": 2}
        assert stats["rate_limited"] == {"requests": 2, "tokens": 0}
        assert [event[0] for event in stats["events"]] == pytest.approx([0, 10, 15, 69.999, 75])


def test_a_limit_also_holds_over_each_second() -> None:
    """600 RPM admits at most 10 requests in any second, not 600 at once; the 11th is told to wait for the second."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, rpm=600), clock=clock) as limited:
        assert [chat(limited, f"r{i}")[0] for i in range(10)] == [200] * 10
        status, headers, _ = chat(limited, "r10")
        assert (status, headers["retry-after-ms"]) == (429, "1000")
        clock.advance(1.0)
        assert chat(limited, "r11")[0] == 200, "the refused request left the one-second window with the others"


@pytest.mark.parametrize(("mode", "present"), [("full", True), ("retry-after", False), ("none", False)])
def test_rate_headers_can_be_reduced_like_some_gateways(mode: str, present: bool) -> None:
    """--rate-headers full|retry-after|none: how much a provider says about its limits."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, rpm=1, rate_headers=mode), clock=clock) as limited:
        ok_headers = chat(limited, "a")[1]
        status, headers, _ = chat(limited, "b")
        assert status == 429
        assert ("x-ratelimit-limit-requests" in ok_headers) is present
        assert ("x-ratelimit-remaining-requests" in headers) is present
        assert ("retry-after" in headers) is (mode != "none")


def test_tpm_charges_prompt_plus_max_tokens_and_refuses_oversized_requests() -> None:
    """TPM charges the prompt estimate plus max_tokens; a request larger than the limit gets 429 without retry-after."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, tpm=100, tokenizer="estimate"), clock=clock) as limited:
        text = "x" * 22  # with the 18-character system message: ceil(40 / 4) + 2 messages * 3 = 16 tokens
        status, headers, body = chat(limited, text, max_tokens=50)
        assert (status, headers["x-ratelimit-remaining-tokens"]) == (200, "34")
        assert json.loads(body)["usage"]["prompt_tokens"] == 16
        clock.advance(20)
        status, headers, body = chat(limited, text, max_completion_tokens=50)
        assert (status, headers["retry-after-ms"], headers["x-ratelimit-reset-tokens"]) == (429, "40000", "40s")
        assert json.loads(body)["error"]["type"] == "tokens"
        status, headers, body = chat(limited, text, max_tokens=500)
        assert status == 429
        assert "retry-after" not in headers
        assert "Request too large" in json.loads(body)["error"]["message"]


def test_429_through_the_sdk_has_sane_headers(sim: SimulatorThread) -> None:
    """An RPM 429 is a RateLimitError with retry-after >= 1 s, agreeing with retry-after-ms and the reset headers."""
    sim.configure(rpm=1)

    async def work(client: AsyncOpenAI) -> openai.RateLimitError:
        await ask(client, "first")
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(client, "second")
        return caught.value

    error = with_sdk(sim, work)
    headers = error.response.headers
    retry_ms = int(headers["retry-after-ms"])
    assert 55_000 < retry_ms <= 60_000
    assert int(headers["retry-after"]) == math.ceil(retry_ms / 1000)
    check(int(headers["retry-after"]), f"{TOO_MANY}/headers/Retry-After/schema")
    check(json.loads(error.response.content), f"{TOO_MANY}/content/application~1json/schema")
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("1", "0")
    assert DURATION.match(headers["x-ratelimit-reset-requests"])
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    check({"error": error.body}, ERROR)


def test_successful_replies_carry_ratelimit_headers_only_when_limited(sim: SimulatorThread) -> None:
    """x-ratelimit-* headers appear on 200s whenever a limit is configured, and never otherwise."""
    assert not [name for name in chat(sim, "x")[1] if name.startswith("x-ratelimit")]
    sim.configure(rpm=100, tpm=10_000)
    headers = chat(sim, "x")[1]
    assert headers["x-ratelimit-remaining-requests"] == "99"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert DURATION.match(headers["x-ratelimit-reset-tokens"])


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"kind": "status", "status": 500}, openai.InternalServerError),
        ({"kind": "status", "status": 503}, openai.InternalServerError),
        ({"kind": "status", "status": 429, "retry_after": 2}, openai.RateLimitError),
        ({"kind": "status", "status": 400, "code": "invalid_value", "message": "nope"}, openai.BadRequestError),
        ({"kind": "reset"}, openai.APIConnectionError),
        ({"kind": "close_after_headers"}, openai.APIConnectionError),
        ({"kind": "hang"}, openai.APITimeoutError),
    ],
    ids=["500", "503", "429", "400", "reset", "close_after_headers", "hang"],
)
def test_exchange_faults_reach_the_sdk_as_errors(
    sim: SimulatorThread, fault: dict[str, Any], error: type[Exception], transport: str
) -> None:
    """Each exchange-level fault reaches the SDK as the matching error on both transports; the next request is fine."""

    async def work(client: AsyncOpenAI) -> tuple[Exception, ChatCompletion]:
        with pytest.raises(error) as caught:
            await ask(client, "x", timeout=0.5)
        return caught.value, await ask(client, "x")

    sim.script([fault])
    caught, after = with_sdk(sim, work, transport)
    if isinstance(caught, openai.APIStatusError):
        assert caught.status_code == fault["status"]
        assert caught.code == fault.get("code", "rate_limit_exceeded" if fault["status"] == 429 else None)
        assert caught.response.headers.get("retry-after") == ("2" if fault["status"] == 429 else None)
    assert after.choices[0].finish_reason == "stop"
    sim.wait_idle()  # a hang ends when the client gives up on it
    stats = sim.stats()
    assert stats["by_fault"] == {fault["kind"]: 1}
    assert stats["in_flight"] == 0


def _extra_text_ok(content: str) -> bool:
    return (
        content.startswith("Sure")
        and json.loads(content[content.index("{") : content.rindex("}") + 1])["label"] in LABELS
    )


def _not_json(content: str) -> bool:
    try:
        json.loads(content)
    except ValueError:
        return True
    return False


REPLY_CHECKS: dict[str, Callable[[Any], bool]] = {
    "bad_json_content": lambda m: _not_json(m.content),
    "label_outside": lambda m: json.loads(m.content)["label"] not in LABELS,
    "empty_content": lambda m: m.content == "",
    "extra_text": lambda m: _extra_text_ok(m.content),
    "length": lambda m: _not_json(m.content),
    "content_filter": lambda m: m.content is None,
    "refusal": lambda m: m.content is None and bool(m.refusal),
}
FINISH = {"length": "length", "content_filter": "content_filter"}


@pytest.mark.parametrize("kind", sorted(REPLY_CHECKS))
def test_reply_faults_are_valid_completions_with_unusable_content(sim: SimulatorThread, kind: str) -> None:
    """Each malformed-reply fault is a schema-valid completion whose content or finish_reason gives no label."""
    sim.script([{"kind": kind, "count": 2}])
    status, _, body = chat(sim, "x", response_format=label_format(LABELS))
    assert status == 200
    check(json.loads(body), COMPLETION)
    completion = with_sdk(sim, lambda c: ask(c, "x", response_format=label_format(LABELS)))
    choice = completion.choices[0]
    assert choice.finish_reason == FINISH.get(kind, "stop")
    assert REPLY_CHECKS[kind](choice.message)
    assert sim.stats()["completed_ok"] == 0


def test_label_outside_in_a_multi_label_reply(sim: SimulatorThread) -> None:
    """label_outside puts a label from outside the enum into a multi-label array too."""
    sim.script([{"kind": "label_outside"}])
    labels = label_of(chat(sim, "x", response_format=label_format(LABELS, multi=True))[2])
    assert not set(labels) <= set(LABELS)


def test_not_json_reply_depends_on_its_content_type(sim: SimulatorThread) -> None:
    """not_json is a 200 HTML page: the SDK returns it as a str, or raises a JSON error when it claims to be JSON."""
    sim.script([{"kind": "not_json"}, {"kind": "not_json", "content_type": "application/json"}])

    async def work(client: AsyncOpenAI) -> Any:
        first = await ask(client, "x")
        with pytest.raises(json.JSONDecodeError):
            await ask(client, "x")
        return first

    page = with_sdk(sim, work)
    assert isinstance(page, str)
    assert page.startswith("<html>")


def test_delay_and_slow_body_still_deliver_a_good_reply(sim: SimulatorThread) -> None:
    """`delay` waits, `slow_body` trickles the reply, a hang outlives its seconds: each ends in a normal completion."""
    for fault in (
        {"kind": "delay", "seconds": 0.2},
        {"kind": "slow_body", "seconds": 0.2},
        {"kind": "hang", "seconds": 0.2},
    ):
        sim.script([fault])
        started = time.monotonic()
        completion = with_sdk(sim, lambda c: ask(c, "x", response_format=label_format(LABELS)))
        assert time.monotonic() - started >= 0.18  # slow_body pauses 9 of its 10 pieces
        assert json.loads(completion.choices[0].message.content or "")["label"] in LABELS
    assert sim.stats()["completed_ok"] == 3


def test_status_faults_send_exactly_the_scripted_headers(sim: SimulatorThread) -> None:
    """A status fault sends its retry-after (fractional allowed), retry-after-ms and extra headers as scripted."""
    sim.script(
        [
            {"kind": "status", "status": 429, "retry_after": 0.35, "type": "tokens", "message": "slow down"},
            {"kind": "status", "status": 503, "retry_after_ms": 250, "headers": {"x-should-retry": "true"}},
            {"kind": "status", "status": 429, "code": "insufficient_quota", "type": "insufficient_quota"},
        ]
    )
    status, headers, body = chat(sim, "x")
    assert (status, headers["retry-after"], "retry-after-ms" in headers) == (429, "0.35", False)
    assert json.loads(body)["error"] | {"param": None} == {
        "message": "slow down",
        "type": "tokens",
        "code": "rate_limit_exceeded",
        "param": None,
    }
    status, headers, _ = chat(sim, "x")
    assert (status, headers["retry-after-ms"], headers["x-should-retry"], "retry-after" in headers) == (
        503,
        "250",
        "true",
        False,
    )
    status, headers, body = chat(sim, "x")
    assert (status, json.loads(body)["error"]["code"], "retry-after" in headers) == (429, "insufficient_quota", False)


def test_scripted_faults_apply_in_order_and_run_out(sim: SimulatorThread) -> None:
    """Scripted faults serve the next requests in order, each for its count, then replies are normal again."""
    sim.script([{"kind": "status", "status": 500, "count": 2}, {"kind": "status", "status": 503}])
    sim.script([{"kind": "empty_content"}])
    statuses = [chat(sim, "x")[0] for _ in range(4)]
    assert statuses == [500, 500, 503, 200]
    assert content_of(chat(sim, "x")[2]) != ""


def test_match_scoped_fault_hits_only_matching_rows_forever(sim: SimulatorThread) -> None:
    """A fault with `match` and count -1 fails every request whose last user message contains the text, and no other."""
    sim.script([{"kind": "status", "status": 502, "match": "row-7", "count": -1}, {"kind": "status", "status": 500}])
    assert chat(sim, "row-8 is fine")[0] == 500  # skips the match-scoped fault, takes the next one
    for _ in range(3):
        assert chat(sim, "row-7 always fails")[0] == 502
        assert chat(sim, "row-8 is fine")[0] == 200
    assert (
        call(sim, "GET", "/control/faults")[2]
        == json.dumps(
            {"pending": [{"kind": "status", "count": -1, "match": "row-7", "status": 502}]}, separators=(",", ":")
        ).encode()
    )


def test_random_faults_follow_the_seed(sim: SimulatorThread) -> None:
    """error_rate and malformed_rate draw from the seeded RNG: 500/502/503 and malformed kinds, replayed by the seed."""

    def run() -> list[tuple[int, str | None]]:
        sim.configure(error_rate=0.3, malformed_rate=0.3, seed=7)  # also reseeds
        start = len(sim.stats()["events"])
        for i in range(60):
            chat(sim, f"row {i}", response_format=label_format(LABELS))
        return [(status, fault) for _, status, fault in sim.stats()["events"][start:]]

    first = run()
    assert run() == first
    statuses = {status for status, _ in first}
    kinds = {fault for _, fault in first}
    assert statuses == {200, 500, 502, 503}
    assert {kind for kind in kinds if kind not in (None, "status")} <= set(MALFORMED_KINDS)
    assert len(kinds) > 4


def test_hang_rate_hangs_until_the_client_gives_up(sim: SimulatorThread) -> None:
    """hang_rate 1 holds every reply until the client times out, after which the server has nothing in flight."""
    sim.configure(hang_rate=1.0)

    async def work(client: AsyncOpenAI) -> None:
        with pytest.raises(openai.APITimeoutError):
            await ask(client, "x", timeout=0.3)

    with_sdk(sim, work)
    sim.wait_idle()
    assert sim.stats()["by_status"] == {"499": 1}


# --- stats and control -----------------------------------------------------------------------


def test_stats_count_statuses_faults_tokens_and_events(sim: SimulatorThread) -> None:
    """/stats counts requests by status and fault, sums the usage it sent, and logs [t, status, fault] per request."""
    sim.script([{"kind": "status", "status": 500, "match": "four"}, {"kind": "label_outside", "match": "five"}])
    bodies = [chat(sim, text)[2] for text in ("one", "two", "three", "four", "five")]
    usages = [json.loads(body)["usage"] for i, body in enumerate(bodies) if i != 3]
    status, _, raw = call(sim, "GET", "/stats")
    stats = json.loads(raw)
    assert status == 200
    assert stats["requests"] == 5
    assert stats["by_status"] == {"200": 4, "500": 1}
    assert stats["by_fault"] == {"status": 1, "label_outside": 1}
    assert stats["completed_ok"] == 3
    assert stats["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert stats["completion_tokens"] == sum(u["completion_tokens"] for u in usages)
    assert [event[1:] for event in stats["events"]] == [[200, None]] * 3 + [[500, "status"], [200, "label_outside"]]
    times = [event[0] for event in stats["events"]]
    assert times == sorted(times)
    assert (stats["in_flight"], stats["max_in_flight"]) == (0, 1)
    assert stats["loop_thread_cpu_seconds"] > 0
    assert "events" not in json.loads(call(sim, "GET", "/stats?events=0")[2])


def test_in_flight_gauge_sees_concurrent_requests(sim: SimulatorThread) -> None:
    """max_in_flight reports how many requests were under way at once, and in_flight returns to 0."""
    sim.script([{"kind": "delay", "seconds": 0.5, "count": 5}])

    async def work(client: AsyncOpenAI) -> list[ChatCompletion]:
        return await asyncio.gather(*(ask(client, f"row {i}") for i in range(5)))

    assert len(with_sdk(sim, work)) == 5
    stats = sim.stats()
    assert (stats["in_flight"], stats["max_in_flight"]) == (0, 5)


def test_sdk_retry_waits_for_retry_after_by_the_server_clock(sim: SimulatorThread) -> None:
    """After a 429 with retry-after-ms, the SDK's own retry reaches the server no sooner, per the server's events."""
    sim.script([{"kind": "status", "status": 429, "retry_after_ms": 300}])
    assert with_sdk(sim, lambda c: ask(c, "x"), max_retries=1).choices
    (t_429, status_429, _), (t_retry, status_retry, _) = sim.stats()["events"]
    assert (status_429, status_retry) == (429, 200)
    assert t_retry - t_429 >= 0.3


def test_control_endpoints_script_configure_and_reset(sim: SimulatorThread) -> None:
    """The HTTP control endpoints script faults, change settings, reset, and refuse bad input with an OpenAI 400."""
    status, headers, body = call(sim, "POST", "/control/faults", {"faults": [{"kind": "status", "status": 502}]})
    assert (status, json.loads(body)["pending"]) == (200, [{"kind": "status", "count": 1, "status": 502}])
    assert headers["x-request-id"].startswith("req_")
    assert chat(sim, "x")[0] == 502
    for bad in ({"faults": [{"kind": "explode"}]}, {"faults": [{"kind": "hang", "secs": 1}]}, {"faults": "x"}):
        status, _, body = call(sim, "POST", "/control/faults", bad)
        assert status == 400
        check(json.loads(body), ERROR)
    status, _, body = call(sim, "POST", "/control/config", {"rpm": 5, "models": ["m1"], "api_key": "sk-x"})
    assert json.loads(body)["config"] == {
        **SimulatorConfig(latency_ms=0).to_json(),
        "rpm": 5,
        "models": ["m1"],
        "api_key": "<set>",
    }
    assert sim.config.models == frozenset({"m1"})
    for bad_config in ({"error_rate": 2}, {"bogus": 1}, {"rpm": "many"}, [1]):
        assert call(sim, "POST", "/control/config", bad_config)[0] == 400
    assert call(sim, "POST", "/stats/reset")[0] == 200
    assert sim.stats()["requests"] == 0
    call(sim, "POST", "/control/faults", [{"kind": "hang"}])
    assert json.loads(call(sim, "POST", "/control/reset")[2])["config"]["rpm"] is None
    assert json.loads(call(sim, "GET", "/control/faults")[2]) == {"pending": []}


def test_thread_reset_restores_the_starting_state(sim: SimulatorThread) -> None:
    """SimulatorThread.reset restores the starting config and clears stats, scripted faults and window use."""
    sim.configure(rpm=1, latency_ms=5)
    chat(sim, "x")
    sim.script([{"kind": "hang", "count": -1}])
    sim.reset()
    assert sim.config == SimulatorConfig(latency_ms=0)
    assert sim.stats()["requests"] == 0
    assert [chat(sim, "x")[0] for _ in range(3)] == [200] * 3


@pytest.mark.parametrize(
    "bad",
    [{"error_rate": 1.5}, {"error_rate": 0.6, "malformed_rate": 0.6}, {"rpm": 0}, {"latency_ms": -1}],
)
def test_config_rejects_impossible_settings(bad: dict[str, Any]) -> None:
    """SimulatorConfig refuses rates outside 0..1 (or summing past 1), limits below 1 and negative latency."""
    with pytest.raises(ValueError, match="must"):
        SimulatorConfig(**bad)


def test_script_rejects_bad_faults_in_the_caller(sim: SimulatorThread) -> None:
    """SimulatorThread.script raises in the calling thread for an unknown kind, parameter or count."""
    for bad in ({"kind": "explode"}, {"kind": "hang", "secs": 1}, {"kind": "status", "count": 0}):
        with pytest.raises((ValueError, TypeError)):
            sim.script([bad])


def test_stop_ends_a_hang_at_once() -> None:
    """Stopping a simulator releases a hanging request with its reply instead of waiting out hang_seconds."""

    async def main() -> tuple[bool, float, int]:
        sim = Simulator(SimulatorConfig(latency_ms=0))
        await sim.start()
        sim.script([{"kind": "hang"}])  # hang_seconds defaults to an hour
        async with aiohttp.ClientSession() as session:

            async def request() -> int:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                async with session.post(f"{sim.base_url}/chat/completions", json=body) as response:
                    return response.status

            task = asyncio.create_task(request())
            done, _ = await asyncio.wait({task}, timeout=0.3)  # asserts it hangs; not used to synchronise
            started = time.monotonic()
            await sim.stop()
            return bool(done), time.monotonic() - started, await task

    finished_early, stop_seconds, status = asyncio.run(main())
    assert not finished_early
    assert stop_seconds < 1.0
    assert status == 200


def test_refuses_to_listen_beyond_loopback() -> None:
    """The simulator refuses any host that is not a loopback address."""
    with pytest.raises(ValueError, match="loopback"):
        SimulatorThread(host="0.0.0.0")  # noqa: S104 - the address being refused
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(Simulator().start("192.0.2.1"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_announces_writes_port_file_and_stops_on_signal(tmp_path: Path, signum: int) -> None:
    """`serve` prints its URL, writes the port file, answers, and exits 0 on SIGTERM or SIGINT."""
    port_file = tmp_path / "sim.port"
    code = (
        "import sys; from pathlib import Path; from pipeline.simulator import SimulatorConfig, serve; "
        "serve(SimulatorConfig(latency_ms=0), port_file=Path(sys.argv[1]))"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks until the server is listening
            port = int(port_file.read_text())
            assert line == f"simulator listening on http://127.0.0.1:{port}/v1\n"
            assert not list(tmp_path.glob(".*.tmp"))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models")
            assert conn.getresponse().status == 200
            conn.close()
            proc.send_signal(signum)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_prompt_tokens_follow_the_models_encoding() -> None:
    """With bpe-openai installed, Hangul costs about a token a syllable (as the API counts), not 4 characters each."""
    pytest.importorskip("bpe_openai")
    korean = "배송이 빠르고 포장도 꼼꼼했어요. 또 살게요! 사이즈도 딱 맞고 색감도 예뻐요."
    with SimulatorThread(SimulatorConfig(latency_ms=0)) as exact:
        _, _, body = chat(exact, korean)
        counted = json.loads(body)["usage"]["prompt_tokens"]
    with SimulatorThread(SimulatorConfig(latency_ms=0, tokenizer="estimate")) as rough:
        _, _, body = chat(rough, korean)
        estimated = json.loads(body)["usage"]["prompt_tokens"]
    assert counted > estimated * 1.5, (counted, estimated)
