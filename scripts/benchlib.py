"""Shared parts of the benchmark scripts: a simulator in its own process, timed and measured child runs.

Every load here goes to 127.0.0.1 and is bounded in rows and in time (each child has a timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Measured:
    """What one child process did."""

    elapsed_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def simulator(*args: str) -> Iterator[str]:
    """Run `labelstream simulate` in its own process; yield its base URL."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen(
            [PY, "-m", "pipeline", "simulate", "--port", "0", "--port-file", str(port_file), *args],
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("simulator did not start")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{int(port_file.read_text())}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def sim_stats(base_url: str, *, events: bool = False) -> dict[str, object]:
    """GET /stats from the simulator (with its per-request event log when asked)."""
    import urllib.request  # noqa: PLC0415

    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats?events={int(events)}", timeout=10) as reply:  # noqa: S310
        return json.loads(reply.read())  # type: ignore[no-any-return]


def sim_reset(base_url: str) -> None:
    """Clear the simulator's counters, scripted faults and rate windows (its starting config stays)."""
    import urllib.request  # noqa: PLC0415

    root = base_url.removesuffix("/v1")
    request = urllib.request.Request(f"{root}/control/reset", method="POST", data=b"")  # noqa: S310
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback only
        pass


def run_child(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> Measured:
    """Run a command, measuring wall time, CPU time and peak RSS (sampled from /proc every 50 ms)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            done.wait(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done.set()
    watcher.join()
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(elapsed, cpu, peak / 1024, proc.returncode, out.decode(), err.decode())


def make_csv(path: Path, rows: int) -> Path:
    """A benchmark input of `rows` rows (the same generator as the bundled sample)."""
    subprocess.run([PY, "scripts/make_sample.py", str(path), str(rows)], cwd=ROOT, check=True, capture_output=True)
    return path


def labelstream_cmd(input_csv: Path, output: Path, base_url: str, *extra: str, dedupe: bool = False) -> list[str]:
    """The CLI command for a benchmark run: one request per row unless `dedupe` (the sample repeats texts, and
    with dedupe on, the default, a transport benchmark would measure fewer requests than the old design sends)."""
    flags = [*extra] if dedupe or "--no-dedupe" in extra else [*extra, "--no-dedupe"]
    return [
        PY, "-m", "pipeline", "label", "--input", str(input_csv), "--output", str(output),
        "--config", "configs/sentiment.toml", "--base-url", base_url, "--no-progress", *flags,
    ]  # fmt: skip
