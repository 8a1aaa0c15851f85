"""Faults the simulator can inject, scripted through `/control/faults` or drawn at random."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

# Faults that act on the HTTP exchange itself: its status, its timing or its connection.
TRANSPORT_KINDS: Final = frozenset({"status", "hang", "reset", "close_after_headers", "slow_body", "delay"})
# Faults that return 200 with a reply a client cannot use as a label; `malformed_rate` draws from these.
MALFORMED_KINDS: Final = (
    "not_json",
    "bad_json_content",
    "label_outside",
    "empty_content",
    "extra_text",
    "length",
    "content_filter",
    "refusal",
)
# "pad": what a weak model under a JSON grammar does (vLLM's default structured output): "{" and whitespace until
# max_tokens, finish_reason "length", every allowed token billed. Deterministic for a row at temperature 0, so
# `length_rate` picks rows, not requests; a script can also ask for it.
PAD_KIND: Final = "pad"
FAULT_KINDS: Final = TRANSPORT_KINDS | frozenset(MALFORMED_KINDS) | {PAD_KIND}

# message, type, code: what the real API sends for each status.
_STATUS_DEFAULTS: Final[dict[int, tuple[str, str, str | None]]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Request timed out.", "timeout", None),
    409: ("The request conflicted with another request.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}

NOT_JSON_BODY: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n"
    b"<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def status_error(status: int) -> tuple[str, str, str | None]:
    """Default (message, type, code) for an error status."""
    if status in _STATUS_DEFAULTS:
        return _STATUS_DEFAULTS[status]
    return ("Simulated error.", "server_error" if status >= 500 else "invalid_request_error", None)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault: what happens, to how many requests, and to which ones.

    count: requests it applies to; -1 means every matching request from now on.
    match: apply only to requests whose last user message contains this text.
    status, message, code, type, retry_after, retry_after_ms, headers: the `status` kind's reply.
    seconds: how long `hang` (default: the config's hang_seconds), `delay` and `slow_body` (default 1) take.
    content_type: the `not_json` reply's Content-Type.
    """

    kind: str
    count: int = 1
    match: str | None = None
    status: int = 500
    message: str | None = None
    code: str | None = None
    type: str | None = None
    retry_after: float | None = None
    retry_after_ms: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float | None = None
    content_type: str = "text/html; charset=utf-8"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {', '.join(sorted(FAULT_KINDS))}")
        if self.count == 0 or self.count < -1:
            raise ValueError(f"fault count must be positive or -1 (forever), got {self.count}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP status, got {self.status}")
        if self.seconds is not None and self.seconds < 0:
            raise ValueError(f"fault seconds must not be negative, got {self.seconds}")

    @classmethod
    def from_json(cls, raw: Any) -> Fault:
        """Build a fault from its JSON form, e.g. {"kind": "status", "status": 429, "count": 3}."""
        if not isinstance(raw, Mapping):
            raise TypeError(f"a fault must be a JSON object, got {raw!r}")
        known = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise ValueError(f"unknown fault parameter(s) {unknown}; known: {sorted(known)}")
        values = dict(raw)
        if "kind" not in values:
            raise ValueError(f"a fault needs a 'kind': {dict(raw)!r}")
        headers = values.pop("headers", None) or {}
        if not isinstance(headers, Mapping):
            raise TypeError(f"fault headers must be an object, got {headers!r}")
        _check_types(values)
        return cls(**values, headers=tuple((str(k), str(v)) for k, v in headers.items()))

    def to_json(self) -> dict[str, Any]:
        """The JSON form, without parameters left at their defaults."""
        out: dict[str, Any] = {"kind": self.kind, "count": self.count}
        for field in dataclasses.fields(self)[2:]:
            value = getattr(self, field.name)
            if value != field.default:
                out[field.name] = dict(value) if field.name == "headers" else value
        return out


_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "kind": (str,),
    "count": (int,),
    "match": (str, type(None)),
    "status": (int,),
    "message": (str, type(None)),
    "code": (str, type(None)),
    "type": (str, type(None)),
    "retry_after": (int, float, type(None)),
    "retry_after_ms": (int, float, type(None)),
    "seconds": (int, float, type(None)),
    "content_type": (str,),
}


def _check_types(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        # bool is an int to Python but never a sensible count, status or duration.
        if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[name]):
            raise TypeError(f"fault parameter {name!r} has the wrong type: {value!r}")


@dataclass(slots=True)
class _Pending:
    # Mutable on purpose: `left` counts down as requests use the fault.
    fault: Fault
    left: int


class FaultScript:
    """Scripted faults waiting for the next requests; each request takes the first one that matches it."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, faults: Iterable[Fault]) -> None:
        """Queue `faults` after those already waiting."""
        self._pending.extend(_Pending(fault, fault.count) for fault in faults)

    def clear(self) -> None:
        """Drop every waiting fault."""
        self._pending.clear()

    def take(self, text: str) -> Fault | None:
        """Use up the first waiting fault that applies to a request whose last user message is `text`."""
        for index, entry in enumerate(self._pending):
            match = entry.fault.match
            if match is None or match in text:
                if entry.left > 0:
                    entry.left -= 1
                    if entry.left == 0:
                        del self._pending[index]
                return entry.fault
        return None

    def pending(self) -> list[dict[str, Any]]:
        """Waiting faults in JSON form, `count` being what is left of each."""
        return [{**entry.fault.to_json(), "count": entry.left} for entry in self._pending]


def header_number(value: float) -> str:
    """A number for a header: "2" rather than "2.0", "0.35" as given."""
    return str(int(value)) if float(value).is_integer() else str(value)


def status_reply(fault: Fault, headers: dict[str, str]) -> tuple[int, bytes]:
    """Status and body of a `status` fault; adds its retry-after and extra headers to `headers`."""
    message, type_, code = status_error(fault.status)
    if fault.retry_after is not None:
        headers["retry-after"] = header_number(fault.retry_after)
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = header_number(fault.retry_after_ms)
    headers.update(fault.headers)
    code = fault.code if fault.code is not None else code
    return fault.status, error_body(fault.message or message, fault.type or type_, code)


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep, cut short when the simulator stops so that shutdown never waits on a hang."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)


async def drop_connection(
    request: web.BaseRequest,
    stopping: asyncio.Event,
    *,
    reset: bool,
    prepared: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Close the connection without a (complete) reply: a TCP reset, or a clean close if not `reset`."""
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 makes close send a TCP RST: the client sees a reset, not a clean EOF.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    # aiohttp cancels this handler as soon as it sees the connection go (handler_cancellation);
    # only a stopping server gets past this wait, and aiohttp ignores a reply to a closed socket.
    await stopping.wait()
    return prepared if prepared is not None else web.Response(status=499)


async def close_after_headers(
    request: web.BaseRequest, stopping: asyncio.Event, payload: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """Send 200, headers announcing the whole body and half of it, then close."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    # Writing part of the body puts the headers on the wire before the connection closes.
    await response.write(payload[: len(payload) // 2])
    return await drop_connection(request, stopping, reset=False, prepared=response)


async def slow_body(
    request: web.BaseRequest, stopping: asyncio.Event, payload: bytes, headers: dict[str, str], seconds: float
) -> web.StreamResponse:
    """Send a complete 200 reply in ten pieces spread over `seconds`."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    pieces = 10
    step = -(-len(payload) // pieces)
    for start in range(0, len(payload), step):
        if start:
            await pause(stopping, seconds / pieces)
        await response.write(payload[start : start + step])
    await response.write_eof()
    return response
