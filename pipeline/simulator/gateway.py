"""The simulator behind a gateway: `--gateway litellm` reshapes replies the way a LiteLLM proxy does.

Seen in front of real providers (LiteLLM 1.108): rate headers renamed with an `llm_provider-` prefix
(`llm_provider-retry-after`, `llm_provider-x-ratelimit-remaining-requests`, ...); errors with the status
repeated as a string `code` and gateway types (`throttling_error`); an upstream `insufficient_quota` passed on
as `type: throttling_error, code: "429"` with only the message telling; an unknown model answered 400
`Invalid model name`; a bad key answered 400 (`no_db_connection`); and, with its default retries, a request
over the limit held and retried upstream until it fits (`hold_seconds`; LiteLLM's `num_retries: 0` answers
at once, as `hold_seconds=0` does here).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GATEWAYS: Final = ("none", "litellm")
_RENAMED: Final = ("retry-after", "retry-after-ms", "x-ratelimit-")
_PREFIX: Final = "llm_provider-"
# LiteLLM names itself: its version on a reply, a call id on every answer (errors included), as 1.108.7 does.
VERSION_HEADER: Final = ("x-litellm-version", "1.108.7")
CALL_ID_HEADER: Final = "x-litellm-call-id"


def _reshape_error(status: int, body: bytes, model_hint: str) -> tuple[int, bytes]:
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return status, body
    code, message = error.get("code"), str(error.get("message") or "")
    if status == 401:
        status, kind, message = 400, "no_db_connection", "Authentication Error, No connected db."
    elif status == 404 and code == "model_not_found":
        status, kind = 400, "invalid_request_error"
        message = f"Invalid model name passed in model={model_hint}. Call `/v1/models` to view available models."
    elif status == 429:
        kind = "throttling_error"
        message = f"litellm.RateLimitError: RateLimitError: OpenAIException - {message}"
    else:
        kind = str(error.get("type") or "invalid_request_error")
    reshaped = {"error": {"message": message, "type": kind, "param": error.get("param"), "code": str(status)}}
    return status, orjson.dumps(reshaped)


def _rename_headers(response: web.StreamResponse) -> None:
    for name in list(response.headers):
        if name.lower().startswith(_RENAMED):
            response.headers[_PREFIX + name.lower()] = response.headers.pop(name)


def gateway_middleware(
    settings: Callable[[], tuple[str, float]], stopping: asyncio.Event
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware that, while `settings()` says ("litellm", hold seconds), makes
    `/v1/chat/completions` answer like a LiteLLM proxy (it reads the settings per request, so
    `/control/config` can switch it)."""

    @web.middleware
    async def reshape(request: web.Request, handler: Handler) -> web.StreamResponse:
        gateway, hold_seconds = settings()
        if gateway != "litellm" or not request.path.startswith("/v1/chat/completions"):
            return await handler(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold_seconds
        while True:
            response = await handler(request)
            if response.status != 429 or not isinstance(response, web.Response):
                break
            wait = _retry_wait(response)
            quota = b"insufficient_quota" in (response.body or b"")  # type: ignore[operator]
            if quota or wait is None or loop.time() + wait > deadline or stopping.is_set():
                break
            await asyncio.sleep(wait)  # held, then retried upstream, as LiteLLM's default retries do
        if isinstance(response, web.Response) and response.status >= 400 and isinstance(response.body, bytes):
            status, body = _reshape_error(response.status, response.body, await _model_of(request))
            response.set_status(status)
            response.body = body
        _rename_headers(response)
        response.headers[CALL_ID_HEADER] = str(uuid.uuid4())
        if response.status == 200:
            response.headers[VERSION_HEADER[0]] = VERSION_HEADER[1]
        return response

    return reshape


def _retry_wait(response: web.Response) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = response.headers.get(name)
        if value:
            try:
                return float(value) / (1000 if name.endswith("ms") else 1)
            except ValueError:
                return None
    return None


async def _model_of(request: web.Request) -> str:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return "?"
    return str(body.get("model")) if isinstance(body, dict) else "?"
