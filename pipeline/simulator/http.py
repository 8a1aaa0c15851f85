"""The simulator's HTTP plumbing shared by its routes: JSON and error replies, and the API-key check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.faults import error_body
from pipeline.simulator.settings import Exchange

BAD_JSON: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
NO_KEY: Final = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def json_reply(value: Any, *, headers: Mapping[str, str] | None = None, status: int = 200) -> web.Response:
    """A JSON reply."""
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json", headers=headers)


def error_reply(
    ex: Exchange | None,
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str],
) -> web.Response:
    """An OpenAI-shaped error reply; records its status on the exchange, if one is being counted."""
    if ex is not None:
        ex.status = status
    body = error_body(message, type_, code, param)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def check_auth(
    expected: str | None, request: web.Request, headers: dict[str, str], ex: Exchange | None
) -> web.Response | None:
    """The 401 the real API sends when the bearer key is missing or wrong (None: the key is fine)."""
    if expected is None:
        return None
    given = request.headers.get("Authorization")
    if given == expected:
        return None
    if not given:
        return error_reply(ex, 401, NO_KEY, headers=headers)
    # Masked like the real API does it (its start and its last four characters), so that clients'
    # redaction is tested against what a provider really echoes back.
    key = given.removeprefix("Bearer ")
    shown = key[:8] + "*" * 20 + key[-4:] if len(key) > 12 else key[:3] + "*****"
    message = (
        f"Incorrect API key provided: {shown}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    return error_reply(ex, 401, message, code="invalid_api_key", headers=headers)
