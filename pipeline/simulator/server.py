"""The simulator's aiohttp application: /v1/chat/completions and /v1/models (control routes: _simcontrol)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from pipeline.simulator.batches import BatchStore, add_batch_routes
from pipeline.simulator.caching import PromptCache
from pipeline.simulator.chat import ChatRequest, Rejection, Responder
from pipeline.simulator.completion import completion_tokens
from pipeline.simulator.control import add_control_routes
from pipeline.simulator.faults import (
    MALFORMED_KINDS,
    NOT_JSON_BODY,
    PAD_KIND,
    Fault,
    FaultScript,
    close_after_headers,
    drop_connection,
    pause,
    slow_body,
    status_reply,
)
from pipeline.simulator.files import FileStore, add_file_routes
from pipeline.simulator.gateway import gateway_middleware
from pipeline.simulator.hosts import base_url_of, loopback_host
from pipeline.simulator.http import check_auth, error_reply, json_reply
from pipeline.simulator.judge import Judge
from pipeline.simulator.replies import LabelMaker
from pipeline.simulator.settings import Exchange, SimulatorConfig, Stats
from pipeline.simulator.slots import Slots
from pipeline.simulator.windows import Clock, RateLimits

DEFAULT_MODELS: Final = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano")
_RANDOM_ERRORS: Final = tuple(Fault("status", status=status) for status in (500, 502, 503))
_RANDOM_HANG: Final = Fault("hang")
_RANDOM_MALFORMED: Final = tuple(Fault(kind) for kind in MALFORMED_KINDS)
# Faults after which the client still gets a complete, good reply.
_HARMLESS: Final = frozenset({None, "hang", "delay", "slow_body"})
_PAD: Final = Fault(PAD_KIND)


def _picked(text: str, share: float) -> bool:
    """Whether a row is among `share` of all rows, by its text: the same row is picked at every request."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest()) < share * 2**64


_FLEX_BUSY: Final = (
    "Resource unavailable: flex processing has no spare capacity right now. Retry later, or send the request "
    "without service_tier 'flex'."
)
# Seconds a stopping server gives replies under way before cancelling them.
_SHUTDOWN_GRACE: Final = 1.0


class Simulator:
    """The simulator on the running event loop; call its accessors from that loop only.

    clock: monotonic seconds for the rate windows and event times; tests pass a fake one.
    """

    def __init__(self, config: SimulatorConfig | None = None, *, clock: Clock = time.monotonic) -> None:
        self._initial = config if config is not None else SimulatorConfig()
        self._clock = clock
        self._t0 = clock()
        self._labels = LabelMaker()
        self._judge = Judge()
        self._cache = PromptCache(clock)
        self._script = FaultScript()
        self._stats = Stats()
        self._slots = Slots()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._files = FileStore()
        self._responder = Responder(self._labels, self._judge, self._cache, lambda: self._config)
        self._batches = BatchStore(self._responder, self._script, self._files, lambda: self._config, clock)
        self._apply(self._initial)

    def _apply(self, config: SimulatorConfig) -> None:
        self._config = config
        self._limits = RateLimits(
            config.rpm,
            config.tpm,
            clock=self._clock,
            window_seconds=config.window_seconds,
            quantum=config.quantum,
            headers=config.rate_headers,
        )
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}"
        self._fault_rng = random.Random(config.seed)
        # A separate stream, so turning jitter on does not change which requests fail.
        self._jitter_rng = random.Random(config.seed + 1)
        self._flex_rng = random.Random(config.seed + 2)
        self._fault_rate = config.error_rate + config.hang_rate + config.malformed_rate
        self._slots.resize(config.slots)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on `host`:`port` (0 picks a free port) and return the bound port."""
        self._host = loopback_host(host)
        gateway = gateway_middleware(lambda: (self._config.gateway, self._config.hold_seconds), self._stopping)
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[gateway])
        route = app.router
        route.add_post("/v1/chat/completions", self._chat)
        route.add_get("/v1/models", self._models)
        add_file_routes(route, self._files, self)
        add_batch_routes(route, self._batches, self)
        add_control_routes(route, self)
        route.add_route("*", "/{tail:.*}", self._not_found)
        # handler_cancellation: a client that goes away cancels its handler, which ends hangs and drops.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, port, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        """Stop listening; hangs end at once, replies under way get a short grace period."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        """The bound port (0 before `start`)."""
        return self._port

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client, e.g. http://127.0.0.1:8787/v1."""
        if not self._port:
            raise RuntimeError("the simulator is not running; call start() first")
        return base_url_of(self._host, self._port)

    @property
    def config(self) -> SimulatorConfig:
        """The settings in force."""
        return self._config

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change settings (see `SimulatorConfig.replace`); resets the rate windows and the fault RNG."""
        self._apply(self._config.replace(**changes))
        return self._config

    def script(self, scripted: Iterable[Mapping[str, Any] | Fault]) -> None:
        """Queue faults for the next requests, after any already waiting."""
        self._script.add([f if isinstance(f, Fault) else Fault.from_json(f) for f in scripted])

    def clear_faults(self) -> None:
        """Drop every scripted fault still waiting."""
        self._script.clear()

    def pending_faults(self) -> list[dict[str, Any]]:
        """Scripted faults still waiting, with what is left of their counts."""
        return self._script.pending()

    def stats(self, *, events: bool = True) -> dict[str, Any]:
        """Counters, window use, CPU time and (unless `events` is False) the events as [t, status, fault]."""
        out = self._stats.to_json(events=events)
        out["window"] = self._limits.usage()
        out["slots"] = self._slots.usage()
        out["uptime_seconds"] = self._clock() - self._t0
        # Whole process, and the thread running this event loop alone (the server, in SimulatorThread).
        out["cpu_seconds"] = time.process_time()
        out["loop_thread_cpu_seconds"] = time.thread_time()
        return out

    def reset_stats(self) -> None:
        """Zero the counters and forget the events."""
        self._stats.clear()
        self._slots.clear_max()

    def reset(self) -> None:
        """Back to the starting config, with no stats, scripted faults, rate-window use, files or batches."""
        self._apply(self._initial)
        self._script.clear()
        self._stats.clear()
        self._slots.clear_max()
        self._cache.clear()
        self._files.clear()
        self._batches.clear()

    def batch_summary(self) -> dict[str, Any]:
        """Submissions per custom_id, every batch's state and the number of files (`GET /control/batches`)."""
        return self._batches.summary()

    # --- what the Files and Batch routes ask of the server ----------------------------------------

    def admit(self, request: web.Request) -> tuple[dict[str, str], web.Response | None]:
        """Headers with a request id, and the 401 to send instead when the key is wrong."""
        headers = self._request_id(next(self._ids))
        return headers, check_auth(self._auth, request, headers, None)

    def reply_hold(self, name: str) -> float:
        """Seconds to hold a reply of `name` (upload, create, content) after doing its work."""
        return float(getattr(self._config, f"{name}_reply_seconds"))

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the server stops."""
        return self._stopping

    async def wait_idle(self) -> None:
        """Return once no chat request is under way (e.g. after clients gave up on hangs)."""
        await self._idle.wait()

    # --- /v1 -----------------------------------------------------------------------------------

    def _request_id(self, n: int) -> dict[str, str]:
        return {"x-request-id": f"req_{self._id_prefix}{n:024x}"}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        self._idle.clear()
        ex = Exchange(self._clock() - self._t0)
        try:
            return await self._complete(request, ex)
        finally:
            stats.in_flight -= 1
            if not stats.in_flight:
                self._idle.set()
            stats.record(ex)

    async def _parse(self, request: web.Request, ex: Exchange, headers: dict[str, str]) -> ChatRequest | web.Response:
        """The request's parts, or the 401/400/404 the real API would send instead."""
        if (refused := check_auth(self._auth, request, headers, ex)) is not None:
            return refused
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        chat = self._responder.parse(body)
        if isinstance(chat, Rejection):
            return error_reply(ex, chat.status, chat.message, code=chat.code, param=chat.param, headers=headers)
        return chat

    async def _complete(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        n = next(self._ids)
        headers = self._request_id(n)
        chat = await self._parse(request, ex, headers)
        if isinstance(chat, web.Response):
            return chat
        made = self._responder.content(chat)

        # Scripted faults come before the rate windows, so that a test's script plays out exactly.
        fault = self._script.take(chat.text)
        if fault is None:
            budget = chat.completion_budget
            cost = chat.prompt_tokens + (budget if budget is not None else completion_tokens(made[0]))
            if (refusal := self._limits.spend(cost, headers)) is not None:
                self._stats.rate_limited[refusal.dimension] += 1
                message = refusal.message(chat.model)
                return error_reply(ex, 429, message, refusal.dimension, code="rate_limit_exceeded", headers=headers)
            if chat.service_tier == "flex" and self._flex_rng.random() < self._config.flex_unavailable_rate:
                # Flex has no spare capacity: a 429 that is no rate limit (no window was exceeded).
                return error_reply(ex, 429, _FLEX_BUSY, code="resource_unavailable", headers=headers)
            if self._config.length_rate and _picked(chat.text, self._config.length_rate):
                fault = _PAD
            elif self._fault_rate:
                fault = self._random_fault()

        kind = None
        if fault is not None:
            kind = ex.fault = fault.kind
            if kind == "status":
                ex.status, payload = status_reply(fault, headers)
                return web.Response(body=payload, status=ex.status, content_type="application/json", headers=headers)
            if kind == "reset":
                ex.status = 0
                return await drop_connection(request, self._stopping, reset=True)
            if kind in ("hang", "delay"):
                default = self._config.hang_seconds if kind == "hang" else 1.0
                await pause(self._stopping, default if fault.seconds is None else fault.seconds)
        await self._latency()

        ex.status = 200
        if fault is not None and kind == "not_json":
            return web.Response(body=NOT_JSON_BODY, headers={**headers, "Content-Type": fault.content_type})
        payload, completion = self._responder.answer(chat, f"chatcmpl-{self._id_prefix}{n:021x}", kind, made)
        if kind == "close_after_headers":
            return await close_after_headers(request, self._stopping, payload, headers)
        response: web.StreamResponse
        if fault is not None and kind == "slow_body":
            seconds = 1.0 if fault.seconds is None else fault.seconds
            response = await slow_body(request, self._stopping, payload, headers, seconds)
        else:
            response = web.Response(body=payload, content_type="application/json", headers=headers)
        # Only replies that were sent whole count as completed and add to the token totals.
        ex.ok = kind in _HARMLESS
        ex.prompt_tokens, ex.completion_tokens = chat.prompt_tokens, completion
        return response

    def _random_fault(self) -> Fault | None:
        rng, config = self._fault_rng, self._config
        draw = rng.random()
        if draw < config.error_rate:
            return rng.choice(_RANDOM_ERRORS)
        draw -= config.error_rate
        if draw < config.hang_rate:
            return _RANDOM_HANG
        if draw - config.hang_rate < config.malformed_rate:
            return rng.choice(_RANDOM_MALFORMED)
        return None

    async def _latency(self) -> None:
        config = self._config
        delay = config.latency_ms
        if config.latency_jitter_ms:
            delay += self._jitter_rng.uniform(-config.latency_jitter_ms, config.latency_jitter_ms)
        if config.slots is None:
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            return
        async with self._slots.hold() as busy:  # a self-hosted engine: queue for a slot, then share a batch
            delay *= 1 + config.slot_cost * busy / config.slots
            if delay > 0:
                await asyncio.sleep(delay / 1000)

    async def _models(self, request: web.Request) -> web.Response:
        headers = self._request_id(next(self._ids))
        if (refused := check_auth(self._auth, request, headers, None)) is not None:
            return refused
        names = sorted(self._config.models) if self._config.models is not None else DEFAULT_MODELS
        data = [{"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"} for name in names]
        return json_reply({"object": "list", "data": data}, headers=headers)

    async def _not_found(self, request: web.Request) -> web.Response:
        headers = self._request_id(next(self._ids))
        message = f"Invalid URL ({request.method} {request.path})"
        return error_reply(None, 404, message, headers=headers)
