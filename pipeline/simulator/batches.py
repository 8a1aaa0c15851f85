"""The simulator's Batch API: /v1/batches create, retrieve, list and cancel, answered like chat completions.

A batch is checked when it is created (the input file's lines, one model, unique custom_ids, at most 50,000
requests; a bad file makes a `failed` batch, as the real API does) and every request is answered then, by the
same logic as `/v1/chat/completions` (`chat.py`; scripted faults apply, `batch_error_rate` adds 500s). The
requests finish one by one in shuffled order, evenly over `batch_seconds`; what a look at the batch shows
follows from the clock. At the end the output file holds the answered requests and the error file the failed
ones, both in that shuffled order (with `server` "vllm", error lines as vLLM `run_batch` writes them: no
body, the error response under `error`); an expired batch lists its unfinished requests in the error file with code
`batch_expired`; a cancelled one keeps what finished and leaves the rest out.

`submissions` counts how often each custom_id was submitted in an accepted batch, so tests can prove that a
client never submits a row twice.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.batch_input import ENDPOINT, check_create, read_requests
from pipeline.simulator.chat import Rejection, Responder
from pipeline.simulator.faults import MALFORMED_KINDS, Fault, FaultScript, error_body, pause, status_reply
from pipeline.simulator.files import FileStore, Front, error_reply, json_reply
from pipeline.simulator.http import BAD_JSON
from pipeline.simulator.settings import SimulatorConfig
from pipeline.simulator.windows import Clock

TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
_EXPIRED: Final = (
    b'"response":null,"error":{"code":"batch_expired",'
    b'"message":"This request could not be executed before the completion window expired."}}\n'
)


@dataclass(slots=True)
class _Item:
    """One request of a batch, already answered: the status and body its line will carry."""

    number: int
    custom_id: str
    status: int
    body: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Batch:
    """One batch and how far it has got."""

    def __init__(self, batch_id: str, body: dict[str, Any], created: float, items: list[_Item]) -> None:
        self.id = batch_id
        self.input_file_id = str(body["input_file_id"])
        self.metadata: dict[str, str] | None = body.get("metadata")
        self.model: str | None = None
        self.created = created  # on the simulator's clock
        self.created_at = int(time.time())
        self.items = items
        self.errors: list[dict[str, Any]] = []
        self.status = "validating"
        self.done = 0  # items[:done] have finished
        self.cancel_at: float | None = None
        self.stamps: dict[str, int] = {}
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None
        # failed_before[k]: failed requests among items[:k]
        self.failed_before = [0]
        for item in items:
            self.failed_before.append(self.failed_before[-1] + (item.status != 200))


class BatchStore:
    """Batches by id, with the files they read and write in `files`."""

    def __init__(
        self,
        responder: Responder,
        script: FaultScript,
        files: FileStore,
        settings: Callable[[], SimulatorConfig],
        clock: Clock,
    ) -> None:
        self._responder, self._script, self._files = responder, script, files
        self._settings, self._clock = settings, clock
        self._batches: dict[str, _Batch] = {}
        self._prefix = f"{random.getrandbits(24):06x}"
        self.submissions: Counter[str] = Counter()

    def clear(self) -> None:
        """Forget every batch and the submission counts."""
        self._batches.clear()
        self.submissions.clear()

    def get(self, batch_id: str) -> _Batch | None:
        """The batch with this id, brought up to date."""
        batch = self._batches.get(batch_id)
        if batch is not None:
            self.look(batch)
        return batch

    def newest_first(self) -> list[_Batch]:
        """Every batch, the newest first, brought up to date."""
        batches = list(reversed(self._batches.values()))
        for batch in batches:
            self.look(batch)
        return batches

    def create(self, body: Any) -> _Batch | Rejection:
        """A new batch from a `POST /v1/batches` body, or why the API refuses it."""
        if not isinstance(body, dict):
            return Rejection(400, BAD_JSON)
        if (refused := check_create(body)) is not None:
            return refused
        stored = self._files.get(str(body["input_file_id"]))
        if stored is None or stored.purpose != "batch":
            what = "does not exist" if stored is None else f"has purpose {stored.purpose!r}, not 'batch'"
            return Rejection(400, f"Invalid 'input_file_id': {body['input_file_id']} {what}.", param="input_file_id")
        number = len(self._batches) + 1
        batch_id = f"batch_{self._prefix}{number:018x}"
        lines, errors, model = read_requests(stored.data)
        items = [] if errors else self._answer(lines, random.Random(f"{self._settings().seed}-{batch_id}"))
        batch = _Batch(batch_id, body, self._clock(), items)
        batch.errors, batch.model = errors, model
        if not errors:
            self.submissions.update(item.custom_id for item in items)
        self._batches[batch_id] = batch
        return batch

    def cancel(self, batch: _Batch) -> Rejection | None:
        """Start cancelling a batch (again is fine); a batch that has ended cannot be."""
        self.look(batch)
        if batch.status in ("cancelling", "cancelled"):
            return None
        if batch.status in TERMINAL:
            return Rejection(400, f"Cannot cancel a batch with status '{batch.status}'.", "invalid_state")
        batch.cancel_at = self._clock()
        batch.stamps["cancelling_at"] = int(time.time())
        self.look(batch)
        return None

    def _answer(self, lines: list[tuple[str, dict[str, Any]]], rng: random.Random) -> list[_Item]:
        config = self._settings()
        items = []
        for n, (custom_id, body) in enumerate(lines):
            chat = self._responder.parse(body)
            if isinstance(chat, Rejection):
                error = error_body(chat.message, "invalid_request_error", chat.code, chat.param)
                items.append(_Item(n, custom_id, chat.status, error))
                continue
            fault = self._script.take(chat.text)
            if fault is None and config.batch_error_rate and rng.random() < config.batch_error_rate:
                fault = Fault("status", status=500)
            if fault is not None and fault.kind == "status":
                status, error = status_reply(fault, {})
                items.append(_Item(n, custom_id, status, error))
                continue
            # Exchange faults (hang, reset, ...) have no exchange here to act on; malformed replies do apply.
            kind = fault.kind if fault is not None and fault.kind in MALFORMED_KINDS else None
            kind = "bad_json_content" if kind == "not_json" else kind  # a batch line's body is JSON by nature
            completion_id = f"chatcmpl-{self._prefix}b{n:020x}"
            payload, completion = self._responder.answer(chat, completion_id, kind)
            items.append(_Item(n, custom_id, 200, payload, chat.prompt_tokens, completion))
        rng.shuffle(items)
        return items

    def look(self, batch: _Batch) -> None:
        """Bring a batch up to the clock: how many requests have finished, and whether it has ended."""
        if batch.status in TERMINAL:
            return
        if batch.errors:
            self._finish(batch, "failed")
            return
        config, now = self._settings(), self._clock()
        total = len(batch.items)

        def finished_by(moment: float) -> int:
            if config.batch_seconds <= 0:
                return total
            return max(batch.done, min(total, int(total * (moment - batch.created) / config.batch_seconds + 1e-9)))

        batch.stamps.setdefault("in_progress_at", int(time.time()))
        if batch.cancel_at is not None:
            batch.done = finished_by(batch.cancel_at)
            if now >= batch.cancel_at + config.batch_cancel_seconds:
                self._finish(batch, "cancelled")
            else:
                batch.status = "cancelling"
            return
        window_end = batch.created + config.batch_window_seconds
        batch.done = finished_by(min(now, window_end))
        if batch.done >= total:
            batch.stamps["finalizing_at"] = int(time.time())
            self._finish(batch, "completed")
        elif now >= window_end:
            self._finish(batch, "expired")
        else:
            batch.status = "in_progress"

    def _finish(self, batch: _Batch, status: str) -> None:
        batch.status = status
        batch.stamps[f"{status}_at"] = int(time.time())
        finished = batch.items[: batch.done]
        output = b"".join(self._line(batch, item) for item in finished if item.status == 200)
        errors = b"".join(self._line(batch, item) for item in finished if item.status != 200)
        if status == "expired":
            errors += b"".join(self._head(batch, item) + _EXPIRED for item in batch.items[batch.done :])
        if output:
            batch.output_file_id = self._files.add(f"{batch.id}_output.jsonl", "batch_output", output).id
        if errors:
            batch.error_file_id = self._files.add(f"{batch.id}_error.jsonl", "batch_output", errors).id
        for item in batch.items:
            item.body = b""  # in the files now: an ended batch keeps only its counts

    @staticmethod
    def _head(batch: _Batch, item: _Item) -> bytes:
        return b'{"id":"batch_req_%s%08x","custom_id":%s,' % (
            batch.id[-10:].encode(),
            item.number,
            orjson.dumps(item.custom_id),
        )

    def _line(self, batch: _Batch, item: _Item) -> bytes:
        request_id = b"req_%s%08x" % (batch.id[-10:].encode(), item.number)
        if item.status != 200 and self._settings().server == "vllm":
            # vLLM `run_batch`: no body, and its whole error response ({"error": {...}}) under `error`.
            tail = b'"response":{"status_code":%d,"request_id":"vllm-batch-%s","body":null},"error":%s}\n'
            return self._head(batch, item) + tail % (item.status, request_id, item.body)
        tail = b'"response":{"status_code":%d,"request_id":"%s","body":%s},"error":null}\n'
        return self._head(batch, item) + tail % (item.status, request_id, item.body)

    def to_json(self, batch: _Batch) -> dict[str, Any]:
        """The `batch` object (fields without a value are left out, never null)."""
        total = len(batch.items)
        failed = batch.failed_before[batch.done] + (total - batch.done if batch.status == "expired" else 0)
        out: dict[str, Any] = {
            "id": batch.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "created_at": batch.created_at,
            "expires_at": batch.created_at + int(self._settings().batch_window_seconds),
            "request_counts": {
                "total": total,
                "completed": batch.done - batch.failed_before[batch.done],
                "failed": failed,
            },
            **batch.stamps,
        }
        if batch.model is not None:
            out["model"] = batch.model
        if batch.metadata is not None:
            out["metadata"] = batch.metadata
        if batch.errors:
            out["errors"] = {"object": "list", "data": batch.errors}
        if batch.output_file_id is not None:
            out["output_file_id"] = batch.output_file_id
        if batch.error_file_id is not None:
            out["error_file_id"] = batch.error_file_id
        if batch.status in TERMINAL and total:
            done = batch.items[: batch.done]
            prompt = sum(item.prompt_tokens for item in done)
            completion = sum(item.completion_tokens for item in done)
            out["usage"] = {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            }
        return out

    def summary(self) -> dict[str, Any]:
        """What the control plane shows: submissions per custom_id and every batch's state."""
        return {
            "submissions": dict(self.submissions),
            "batches": [
                {"id": b.id, "status": b.status, "requests": len(b.items), "metadata": b.metadata}
                for b in self.newest_first()
            ],
            "files": len(self._files),
            "downloads": self._files.downloads,
        }


def add_batch_routes(router: web.UrlDispatcher, store: BatchStore, front: Front) -> None:
    """Serve POST /v1/batches, GET /v1/batches, GET /v1/batches/{id} and POST /v1/batches/{id}/cancel."""

    async def create(request: web.Request) -> web.Response:
        headers, refused = front.admit(request)
        if refused is not None:
            return refused
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        made = store.create(body)
        if isinstance(made, Rejection):
            return error_reply(made.status, made.message, headers, code=made.code, param=made.param)
        reply = store.to_json(made)  # as created: still validating
        await pause(front.stopping, front.reply_hold("create"))
        return json_reply(reply, headers)

    async def listing(request: web.Request) -> web.Response:
        headers, refused = front.admit(request)
        if refused is not None:
            return refused
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return error_reply(400, "Invalid 'limit': expected an integer from 1 to 100.", headers, param="limit")
        batches = store.newest_first()
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        out: dict[str, Any] = {
            "object": "list",
            "data": [store.to_json(b) for b in page],
            "has_more": len(batches) > limit,
        }
        if page:
            out["first_id"], out["last_id"] = page[0].id, page[-1].id
        return json_reply(out, headers)

    async def retrieve(request: web.Request) -> web.Response:
        headers, refused = front.admit(request)
        if refused is not None:
            return refused
        batch = store.get(request.match_info["batch_id"])
        if batch is None:
            return error_reply(404, f"No batch found with id '{request.match_info['batch_id']}'.", headers)
        return json_reply(store.to_json(batch), headers)

    async def cancel(request: web.Request) -> web.Response:
        headers, refused = front.admit(request)
        if refused is not None:
            return refused
        batch = store.get(request.match_info["batch_id"])
        if batch is None:
            return error_reply(404, f"No batch found with id '{request.match_info['batch_id']}'.", headers)
        if (refusal := store.cancel(batch)) is not None:
            return error_reply(refusal.status, refusal.message, headers, code=refusal.code)
        return json_reply(store.to_json(batch), headers)

    router.add_post("/v1/batches", create)
    router.add_get("/v1/batches", listing)
    router.add_get("/v1/batches/{batch_id}", retrieve)
    router.add_post("/v1/batches/{batch_id}/cancel", cancel)
