"""The simulator's Files and Batch APIs through the unmodified SDK: shapes, timing, faults, expiry, cancellation."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pipeline.simulator import SimulatorConfig, SimulatorThread

from .test_simulator import (
    API,
    EXTRACT,
    LABELS,
    MODEL,
    FakeClock,
    _closed,
    call,
    chat,
    check,
    label_format,
    label_of,
    with_sdk,
)

BATCH = "/components/schemas/Batch"
FILE = "/components/schemas/OpenAIFile"
COMPLETION = "/components/schemas/CreateChatCompletionResponse"
ERROR = "/components/schemas/ErrorResponse"


@functools.cache
def _extract_registry() -> Registry[Any]:
    api = json.loads(EXTRACT.read_text(encoding="utf-8"))
    return Registry().with_resource(API, Resource(contents=_closed(api), specification=DRAFT202012))


def check_both(instance: Any, pointer: str) -> None:
    """Validate against the full description (when present) and the committed extract a clean clone uses."""
    check(instance, pointer)
    jsonschema.Draft202012Validator({"$ref": f"{API}#{pointer}"}, registry=_extract_registry()).validate(instance)


def request_line(custom_id: str, text: str, *, model: str = MODEL, **body: Any) -> dict[str, Any]:
    """One batch request line asking for a label of `text`."""
    messages = [{"role": "system", "content": "Label the message."}, {"role": "user", "content": text}]
    payload = {"model": model, "messages": messages, "response_format": label_format(LABELS), **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def texts(n: int) -> list[tuple[str, str]]:
    return [(f"row-{i:03d}", f"ticket {i}: the app crashed when I paid") for i in range(n)]


async def run_batch(client: AsyncOpenAI, data: bytes, **create: Any) -> Any:
    """Upload `data`, create a batch and return (file, created batch)."""
    uploaded = await client.files.create(file=("requests.jsonl", data), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **create
    )
    return uploaded, batch


def result_lines(sim: SimulatorThread, file_id: str | None) -> list[dict[str, Any]]:
    """The lines of an output or error file, read with the SDK's files.content."""
    if file_id is None:
        return []

    async def read(client: AsyncOpenAI) -> bytes:
        return (await client.files.content(file_id)).content

    return [json.loads(line) for line in with_sdk(sim, read).splitlines()]


def retrieve(sim: SimulatorThread, batch_id: str) -> Any:
    return with_sdk(sim, lambda c: c.batches.retrieve(batch_id))


def test_sdk_runs_a_batch_and_every_object_matches_the_description(sim: SimulatorThread) -> None:
    """files.create, batches.create/retrieve/list, files.content and files.delete all work; each object validates."""
    sim.configure(batch_seconds=0)
    rows = texts(12)
    data = jsonl([request_line(cid, text) for cid, text in rows])

    async def work(client: AsyncOpenAI) -> tuple[Any, ...]:
        uploaded, created = await run_batch(client, data, metadata={"labelstream_submission": "sub_1"})
        done = await client.batches.retrieve(created.id)
        listed = await client.batches.list(limit=5)
        content = (await client.files.content(done.output_file_id or "")).content
        retrieved = await client.files.retrieve(uploaded.id)
        deleted = await client.files.delete(uploaded.id)
        return uploaded, created, done, listed, content, retrieved, deleted

    uploaded, created, done, listed, content, retrieved, deleted = with_sdk(sim, work)
    assert created.status == "validating" and done.status == "completed"
    assert created.metadata == {"labelstream_submission": "sub_1"}
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 12, 0)
    assert [b.id for b in listed.data] == [created.id] and deleted.deleted and retrieved.bytes == len(data)
    for obj, pointer in ((uploaded, FILE), (retrieved, FILE), (created, BATCH), (done, BATCH)):
        check_both(json.loads(obj.model_dump_json(exclude_unset=True)), pointer)
    for path, pointer in (
        (f"/v1/batches/{done.id}", BATCH),
        ("/v1/batches?limit=5", "/components/schemas/ListBatchesResponse"),
        (f"/v1/files/{done.output_file_id}", FILE),
    ):
        status, _, body = call(sim, "GET", path)
        assert status == 200
        check_both(json.loads(body), pointer)
    status, _, body = call(sim, "DELETE", f"/v1/files/{done.output_file_id}")
    check_both(json.loads(body), "/components/schemas/DeleteFileResponse")
    lines = [json.loads(line) for line in content.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [cid for cid, _ in rows]
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        check_both(line["response"]["body"], COMPLETION)
    # The same reply logic as chat completions: a text gets the label a chat request for it gets.
    by_id = {line["custom_id"]: json.loads(line["response"]["body"]["choices"][0]["message"]["content"])["label"]
             for line in lines}  # fmt: skip
    for cid, text in rows[:3]:
        assert by_id[cid] == label_of(chat(sim, text, response_format=label_format(LABELS))[2])


def test_requests_finish_over_batch_seconds_in_shuffled_order(sim: SimulatorThread) -> None:
    """A batch is in progress until batch_seconds pass; its output lines come in an order unlike the input's."""
    sim.configure(batch_seconds=3600)
    rows = texts(40)
    _, created = with_sdk(sim, lambda c: run_batch(c, jsonl([request_line(cid, text) for cid, text in rows])))
    running = retrieve(sim, created.id)
    assert running.status == "in_progress" and running.output_file_id is None
    sim.configure(batch_seconds=0)  # read at every look: batches already running finish at once
    done = retrieve(sim, created.id)
    assert done.status == "completed" and done.completed_at is not None
    order = [line["custom_id"] for line in result_lines(sim, done.output_file_id)]
    assert sorted(order) == [cid for cid, _ in rows] and order != sorted(order)
    assert sim.batch_summary()["submissions"] == {cid: 1 for cid, _ in rows}


def test_item_errors_and_scripted_faults_land_in_the_error_file(sim: SimulatorThread) -> None:
    """batch_error_rate fails items with 500s in the error file; scripted faults spoil or fail matching items."""
    sim.configure(batch_seconds=0, batch_error_rate=0.25, seed=3)
    sim.script(
        [{"kind": "label_outside", "match": "ticket 7:"}, {"kind": "status", "status": 429, "match": "ticket 8:"}]
    )
    rows = texts(60)
    _, created = with_sdk(sim, lambda c: run_batch(c, jsonl([request_line(cid, text) for cid, text in rows])))
    done = retrieve(sim, created.id)
    output, errors = result_lines(sim, done.output_file_id), result_lines(sim, done.error_file_id)
    assert len(output) + len(errors) == 60
    assert done.request_counts.failed == len(errors) and done.request_counts.completed == len(output)
    assert 5 <= len(errors) <= 30
    for line in errors:
        assert line["response"]["status_code"] in (429, 500)
        check_both(line["response"]["body"], ERROR)
    assert {line["custom_id"]: line["response"]["status_code"] for line in errors}.get("row-008") == 429
    spoiled = [line for line in output if line["custom_id"] == "row-007"]
    if spoiled:  # unless the random error rate took that item first
        content = json.loads(spoiled[0]["response"]["body"]["choices"][0]["message"]["content"])
        assert content["label"] not in LABELS


@pytest.fixture
def timed() -> Iterator[tuple[SimulatorThread, FakeClock]]:
    """A simulator of its own whose clock moves only when the test says so."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, batch_seconds=10), clock=clock) as running:
        yield running, clock


def test_expired_batch_keeps_what_finished_and_lists_the_rest_as_batch_expired(
    timed: tuple[SimulatorThread, FakeClock],
) -> None:
    """Past the completion window a batch expires: finished requests in the output, the rest batch_expired."""
    sim, clock = timed
    sim.configure(batch_window_seconds=5)
    rows = texts(20)
    _, created = with_sdk(sim, lambda c: run_batch(c, jsonl([request_line(cid, text) for cid, text in rows])))
    clock.advance(2.5)
    running = retrieve(sim, created.id)
    assert running.status == "in_progress" and running.request_counts.completed == 5
    clock.advance(2.5)
    done = retrieve(sim, created.id)
    assert done.status == "expired" and done.expired_at is not None
    output, errors = result_lines(sim, done.output_file_id), result_lines(sim, done.error_file_id)
    assert len(output) == 10 and len(errors) == 10
    assert {line["custom_id"] for line in output + errors} == {cid for cid, _ in rows}
    assert all(line["error"]["code"] == "batch_expired" and line["response"] is None for line in errors)
    assert (done.request_counts.completed, done.request_counts.failed) == (10, 10)
    check_both(json.loads(done.model_dump_json(exclude_unset=True)), BATCH)


def test_cancelled_batch_keeps_partial_results_and_leaves_the_rest_out(
    timed: tuple[SimulatorThread, FakeClock],
) -> None:
    """Cancelling goes through cancelling to cancelled; requests finished before the cancel stay in the output."""
    sim, clock = timed
    sim.configure(batch_cancel_seconds=1)
    rows = texts(20)
    _, created = with_sdk(sim, lambda c: run_batch(c, jsonl([request_line(cid, text) for cid, text in rows])))
    clock.advance(2.5)
    cancelling = with_sdk(sim, lambda c: c.batches.cancel(created.id))
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    clock.advance(5)  # nothing more finishes once cancelled
    done = retrieve(sim, created.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    check_both(json.loads(done.model_dump_json(exclude_unset=True)), BATCH)
    output = result_lines(sim, done.output_file_id)
    assert len(output) == 5 and done.error_file_id is None  # the other 15 are in neither file
    assert with_sdk(sim, lambda c: c.batches.cancel(created.id)).status == "cancelled"  # again is fine
    sim.configure(batch_seconds=0)
    _, finished = with_sdk(sim, lambda c: run_batch(c, jsonl([request_line("x", "one more")])))
    assert retrieve(sim, finished.id).status == "completed"
    with pytest.raises(openai.BadRequestError):  # an ended batch cannot be cancelled
        with_sdk(sim, lambda c: c.batches.cancel(finished.id))


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([request_line("a", "one"), request_line("a", "two")], "duplicate_custom_id"),
        ([request_line("a", "one"), request_line("b", "two", model="gpt-4o")], "mismatched_model"),
        ([{**request_line("a", "one"), "url": "/v1/embeddings"}], "invalid_url"),
        ([], "empty_file"),
    ],
)
def test_a_bad_input_file_fails_the_batch_with_errors(sim: SimulatorThread, lines: list[Any], code: str) -> None:
    """Duplicate custom_ids, two models, a wrong url or no requests make a failed batch naming the problem."""
    _, created = with_sdk(sim, lambda c: run_batch(c, jsonl(lines)))
    failed = retrieve(sim, created.id)
    assert failed.status == "failed" and failed.errors is not None
    assert code in {error.code for error in failed.errors.data or []}
    check_both(json.loads(failed.model_dump_json(exclude_unset=True)), BATCH)
    assert sim.batch_summary()["submissions"] == {}


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "/v1/embeddings"},
        {"completion_window": "48h"},
        {"input_file_id": "file-missing"},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
    ],
)
def test_create_refuses_what_the_api_refuses(sim: SimulatorThread, change: dict[str, Any]) -> None:
    """Another endpoint, a window other than 24h, an unknown file or too much metadata is a 400."""
    uploaded = with_sdk(
        sim, lambda c: c.files.create(file=("r.jsonl", jsonl([request_line("a", "x")])), purpose="batch")
    )
    body = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
    status, _, reply = call(sim, "POST", "/v1/batches", body)
    assert status == 400
    check_both(json.loads(reply), ERROR)


def test_uploads_check_purpose_and_name_and_files_can_be_deleted(sim: SimulatorThread) -> None:
    """A batch upload must be .jsonl with a known purpose; content returns the bytes; a deleted file is 404."""
    with pytest.raises(openai.BadRequestError):
        with_sdk(sim, lambda c: c.files.create(file=("r.csv", b"{}\n"), purpose="batch"))
    with pytest.raises(openai.BadRequestError):
        with_sdk(sim, lambda c: c.files.create(file=("r.jsonl", b"{}\n"), purpose="nonsense"))  # type: ignore[arg-type]
    uploaded = with_sdk(sim, lambda c: c.files.create(file=("r.jsonl", b'{"a": 1}\n'), purpose="batch"))
    assert with_sdk(sim, lambda c: c.files.content(uploaded.id)).content == b'{"a": 1}\n'
    with_sdk(sim, lambda c: c.files.delete(uploaded.id))
    with pytest.raises(openai.NotFoundError):
        with_sdk(sim, lambda c: c.files.retrieve(uploaded.id))


def test_list_pages_newest_first(sim: SimulatorThread) -> None:
    """batches.list pages with limit and after, newest first; the SDK's iterator walks every page."""
    sim.configure(batch_seconds=0)
    made = [with_sdk(sim, lambda c, i=i: run_batch(c, jsonl([request_line(f"b{i}", "x")])))[1].id for i in range(5)]

    async def every(client: AsyncOpenAI) -> list[str]:
        return [batch.id async for batch in client.batches.list(limit=2)]

    assert with_sdk(sim, every) == made[::-1]
    status, _, body = call(sim, "GET", f"/v1/batches?limit=2&after={made[3]}")
    page = json.loads(body)
    assert status == 200 and [b["id"] for b in page["data"]] == [made[2], made[1]] and page["has_more"]


def test_batch_routes_need_the_key_when_one_is_set(sim: SimulatorThread) -> None:
    """With an API key configured, files and batches answer 401 without it, like chat completions."""
    sim.configure(api_key="sk-right-key-0123456789")
    status, _, body = call(sim, "GET", "/v1/batches")
    assert status == 401
    check_both(json.loads(body), ERROR)
    status, _, _ = call(sim, "GET", "/v1/batches", headers={"Authorization": "Bearer sk-right-key-0123456789"})
    assert status == 200


def test_flex_requests_echo_their_tier_and_can_be_refused_as_resource_unavailable(sim: SimulatorThread) -> None:
    """service_tier flex comes back as flex; flex_unavailable_rate answers 429 resource_unavailable; bad tiers 400."""
    status, _, body = chat(sim, "hello", service_tier="flex")
    assert status == 200 and json.loads(body)["service_tier"] == "flex"
    check_both(json.loads(body), COMPLETION)
    sim.configure(flex_unavailable_rate=1.0)
    status, headers, body = chat(sim, "hello", service_tier="flex")
    assert status == 429 and json.loads(body)["error"]["code"] == "resource_unavailable"
    assert "retry-after" not in headers
    check_both(json.loads(body), ERROR)
    assert sim.stats()["rate_limited"] == {"requests": 0, "tokens": 0}
    assert chat(sim, "hello")[0] == 200  # the default tier is not affected
    assert chat(sim, "hello", service_tier="cheap")[0] == 400
