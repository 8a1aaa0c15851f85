"""The simulator's control plane over HTTP: stats, scripted faults, settings and reset."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol

import orjson
from aiohttp import web

from pipeline.simulator.faults import Fault, error_body
from pipeline.simulator.settings import SimulatorConfig


class Controllable(Protocol):
    """What the control plane needs of a simulator (the server implements it; nothing here imports the server)."""

    @property
    def config(self) -> SimulatorConfig: ...
    def stats(self, *, events: bool = True) -> dict[str, Any]: ...
    def reset_stats(self) -> None: ...
    def pending_faults(self) -> list[dict[str, Any]]: ...
    def clear_faults(self) -> None: ...
    def script(self, scripted: Iterable[Fault]) -> None: ...
    def configure(self, **changes: Any) -> SimulatorConfig: ...
    def reset(self) -> None: ...
    def batch_summary(self) -> dict[str, Any]: ...


def add_control_routes(router: web.UrlDispatcher, sim: Controllable) -> None:
    """Serve /stats, /stats/reset, /control/faults, /control/config and /control/reset for `sim`."""

    async def get_stats(request: web.Request) -> web.Response:
        return _reply(sim.stats(events=request.query.get("events", "1") not in ("0", "false")))

    async def reset_stats(_request: web.Request) -> web.Response:
        sim.reset_stats()
        return _reply({"ok": True})

    async def get_faults(_request: web.Request) -> web.Response:
        return _reply({"pending": sim.pending_faults()})

    async def post_faults(request: web.Request) -> web.Response:
        try:
            scripted, replace = _read_faults(orjson.loads(await request.read()))
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError too
            return _reply({"error": str(exc)}, status=400)
        if replace:
            sim.clear_faults()
        sim.script(scripted)
        return _reply({"pending": sim.pending_faults()})

    async def delete_faults(_request: web.Request) -> web.Response:
        sim.clear_faults()
        return _reply({"pending": []})

    async def get_config(_request: web.Request) -> web.Response:
        return _reply({"config": sim.config.to_json()})

    async def post_config(request: web.Request) -> web.Response:
        try:
            sim.configure(**_settings(orjson.loads(await request.read())))
        except (ValueError, TypeError) as exc:
            return _reply({"error": str(exc)}, status=400)
        return _reply({"config": sim.config.to_json()})

    async def post_reset(_request: web.Request) -> web.Response:
        sim.reset()
        return _reply({"config": sim.config.to_json()})

    async def get_batches(_request: web.Request) -> web.Response:
        return _reply(sim.batch_summary())

    router.add_get("/stats", get_stats)
    router.add_post("/stats/reset", reset_stats)
    router.add_get("/control/faults", get_faults)
    router.add_post("/control/faults", post_faults)
    router.add_delete("/control/faults", delete_faults)
    router.add_get("/control/config", get_config)
    router.add_post("/control/config", post_config)
    router.add_post("/control/reset", post_reset)
    router.add_get("/control/batches", get_batches)


def _reply(value: Any, *, status: int = 200) -> web.Response:
    # Errors keep the API's shape, so that one client-side parser reads them all.
    body = orjson.dumps(value) if status == 200 else error_body(str(value["error"]), "invalid_request_error")
    headers = {"x-request-id": f"req_{os.urandom(16).hex()}"}
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _settings(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError(f'expected a JSON object of settings, e.g. {{"rpm": 600}}, got {raw!r}')
    return raw


def _read_faults(raw: Any) -> tuple[list[Fault], bool]:
    """Faults from a `/control/faults` body ({"faults": [...], "replace": bool} or a bare list)."""
    entries = raw.get("faults") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise TypeError(f'expected {{"faults": [{{"kind": ..., ...}}, ...]}}, got {raw!r}')
    return [Fault.from_json(entry) for entry in entries], isinstance(raw, dict) and bool(raw.get("replace"))
