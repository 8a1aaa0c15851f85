"""Ways to run the simulator: `SimulatorThread` (its own loop in a daemon thread) and `serve` (until a signal)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from pipeline.simulator.faults import Fault
from pipeline.simulator.hosts import base_url_of, loopback_host
from pipeline.simulator.server import Simulator
from pipeline.simulator.settings import SimulatorConfig
from pipeline.simulator.windows import Clock

_T = TypeVar("_T")
# Generous: a call only waits for the loop thread to run a few lines (or to start listening).
_CALL_TIMEOUT: Final = 30.0


class SimulatorThread:
    """A `Simulator` on its own event loop in a daemon thread, driven from any thread.

    Use it as a context manager (or `start`/`stop`). Every method is thread-safe: it runs its
    work on the simulator's loop and waits for the answer.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._config = config if config is not None else SimulatorConfig()
        self._host = loopback_host(host)
        self._requested_port = port
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sim: Simulator | None = None
        self._done: asyncio.Event | None = None
        self._port = 0

    def start(self) -> Self:
        """Start the server thread and return once it is listening."""
        if self._thread is not None:
            raise RuntimeError("this SimulatorThread is already running")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),), name="simulator", daemon=True)
        self._thread.start()
        try:
            self._port = ready.result(timeout=_CALL_TIMEOUT)
        except BaseException:
            self._thread.join(timeout=_CALL_TIMEOUT)
            self._thread = None
            raise
        return self

    async def _main(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            sim = Simulator(self._config, clock=self._clock)
            port = await sim.start(self._host, self._requested_port)
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread, which raises it
            ready.set_exception(exc)
            return
        self._sim, self._loop, self._done = sim, asyncio.get_running_loop(), asyncio.Event()
        ready.set_result(port)
        try:
            await self._done.wait()
        finally:
            await sim.stop()

    def stop(self) -> None:
        """Stop the server and wait for its thread to end."""
        if self._thread is None:
            return
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join()
        self._thread = self._loop = self._sim = self._done = None
        self._port = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, work: Callable[[Simulator], Coroutine[Any, Any, _T]]) -> _T:
        if self._loop is None or self._sim is None:
            raise RuntimeError("the simulator is not running; use it as a context manager or call start()")
        return asyncio.run_coroutine_threadsafe(work(self._sim), self._loop).result(timeout=_CALL_TIMEOUT)

    def _call(self, work: Callable[[Simulator], _T]) -> _T:
        async def on_loop(sim: Simulator) -> _T:
            return work(sim)

        return self._run(on_loop)

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client, e.g. http://127.0.0.1:8787/v1."""
        if not self._port:
            raise RuntimeError("the simulator is not running; use it as a context manager or call start()")
        return base_url_of(self._host, self._port)

    @property
    def config(self) -> SimulatorConfig:
        """The settings in force."""
        return self._call(lambda sim: sim.config)

    def stats(self, *, events: bool = True) -> dict[str, Any]:
        """Counters, window use and events, as `GET /stats` returns them."""
        return self._call(lambda sim: sim.stats(events=events))

    def reset(self) -> None:
        """Restore the starting config and clear stats, scripted faults and rate windows."""
        self._call(lambda sim: sim.reset())

    def script(self, faults: list[Mapping[str, Any]]) -> None:
        """Queue faults (JSON form, as for `POST /control/faults`) for the next requests."""
        parsed = [Fault.from_json(fault) for fault in faults]  # bad input raises here, in the caller
        self._call(lambda sim: sim.script(parsed))

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change settings at runtime (resets the rate windows and the fault RNG); returns the new config."""
        return self._call(lambda sim: sim.configure(**changes))

    def batch_summary(self) -> dict[str, Any]:
        """Submissions per custom_id, every batch's state and the number of files, as `GET /control/batches`."""
        return self._call(lambda sim: sim.batch_summary())

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no chat request is under way; raises TimeoutError after `timeout` seconds."""

        async def idle(sim: Simulator) -> None:
            await asyncio.wait_for(sim.wait_idle(), timeout)

        self._run(idle)


def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, port_file: Path | None = None) -> None:
    """Run a simulator until SIGINT or SIGTERM.

    Prints `simulator listening on http://127.0.0.1:PORT/v1` once listening; `port_file`, if
    given, then holds the port (written atomically, so a reader never sees half of it).
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, loopback_host(host), port, port_file))


async def _serve(config: SimulatorConfig, host: str, port: int, port_file: Path | None) -> None:
    sim = Simulator(config)
    bound = await sim.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        if port_file is not None:
            _write_atomically(port_file, f"{bound}\n")
        print(f"simulator listening on {sim.base_url}", flush=True)
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await sim.stop()


def _write_atomically(path: Path, text: str) -> None:
    # Same directory, so the rename is atomic: a script polling for the file reads all of it or nothing.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
