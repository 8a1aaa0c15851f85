"""What the simulator's Batch API checks in a create request and its input file, as the real API does."""

from __future__ import annotations

from typing import Any, Final

import orjson

from pipeline.simulator.chat import Rejection

ENDPOINT: Final = "/v1/chat/completions"
MAX_REQUESTS: Final = 50_000
_MAX_ERRORS: Final = 20


def check_create(body: dict[str, Any]) -> Rejection | None:
    """What the API refuses at once in a create body (the input file's lines are checked after)."""
    if not isinstance(body.get("input_file_id"), str) or not body["input_file_id"]:
        return Rejection(400, "Missing required parameter: 'input_file_id'.", "missing_required_parameter")
    if body.get("endpoint") != ENDPOINT:
        message = f"Invalid value for 'endpoint': the simulator runs batches for {ENDPOINT} only."
        return Rejection(400, message, "invalid_value", "endpoint")
    if body.get("completion_window") != "24h":
        message = "Invalid value for 'completion_window': only '24h' is supported."
        return Rejection(400, message, "invalid_value", "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        message = "Invalid 'metadata': at most 16 pairs, keys up to 64 characters, values strings up to 512."
        return Rejection(400, message, "invalid_value", "metadata")
    return None


def read_requests(data: bytes) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]], str | None]:
    """The (custom_id, body) of each line of an input file, the errors that fail the batch, and its model."""
    lines: list[tuple[str, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None

    def fail(code: str, message: str, line: int | None) -> None:
        if len(errors) < _MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": None, "line": line})

    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            fail("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            fail("missing_required_parameter", "Each line needs a string 'custom_id'.", number)
        elif custom_id in seen:
            fail("duplicate_custom_id", f"The custom_id {custom_id!r} is used more than once.", number)
        elif not isinstance(line, dict) or line.get("method") != "POST" or line.get("url") != ENDPOINT:
            fail("invalid_url", f"Each line must POST to the batch's endpoint {ENDPOINT}.", number)
        elif not isinstance(body, dict):
            fail("invalid_request", "Each line needs a JSON object 'body'.", number)
        else:
            seen.add(custom_id)
            if model is None and isinstance(body.get("model"), str):
                model = body["model"]
            if body.get("model") != model:
                fail("mismatched_model", "Every request in a batch must use the same model.", number)
            lines.append((custom_id, body))
    if not lines and not errors:
        fail("empty_file", "The input file has no requests.", None)
    if len(lines) > MAX_REQUESTS:
        fail("too_many_requests", f"A batch may hold at most {MAX_REQUESTS:,} requests; this has {len(lines):,}.", None)
    return lines, errors, model
