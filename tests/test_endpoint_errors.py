"""An endpoint that is not there, or is no API, stops the run within seconds with what to check; no row is lost."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.client import LabelClient
from pipeline.api.failures import connection_problem
from pipeline.errors import FatalApiError
from pipeline.ratelimit.limiter import Limiter, LimitSettings, RetryPolicy
from pipeline.results import Failed, Row
from pipeline.task.prompt import Prompt

from .helpers import SENTIMENT, cli, dead_letters, ids_once, label, progress, reviews, write_csv

QUICK = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=30.0)
HTML = b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Html(http.server.BaseHTTPRequestHandler):
    """A web server that is no API: every POST gets an HTML page, 404 or 200 by the path's first part."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(404 if self.path.startswith("/missing/") else 200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(HTML)))
        self.end_headers()
        self.wfile.write(HTML)
        self.server.posts += 1  # type: ignore[attr-defined]  # a counter the test reads

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A plain http.server on loopback that answers with HTML (see `_Html`)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Html)
    server.posts = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_closed_port_stops_the_run_at_once_with_exit_2_and_no_dead_letter(tmp_path: Path) -> None:
    """--base-url to a closed port: one message naming the URL and "connection refused", exit 2 within seconds,
    no row dead-lettered, the progress file says failed, and the message is printed once."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = cli("label", "--input", str(source), "--output", str(out), "--base-url", url, "--no-progress")
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 15
    assert f"cannot connect to {url}: connection refused; is the server running" in result.stderr
    assert result.stderr.count("connection refused") == 1, result.stderr
    assert "timeout" not in result.stderr
    assert dead_letters(out) == []
    assert progress(out)["state"] == "failed" and progress(out)["failed"] == 0


def test_https_to_a_plain_http_server_is_a_tls_failure(sim: Any, tmp_path: Path) -> None:
    """https:// to a server that speaks plain http fails the TLS handshake: a stop that says TLS, not a timeout."""
    url = sim.base_url.replace("http://", "https://")
    with pytest.raises(FatalApiError, match=r"cannot connect to https://.*: TLS failed .*speak https") as caught:
        label(sim, write_csv(tmp_path / "in.csv", reviews(10)), tmp_path / "out.jsonl", base_url=url, retry=QUICK)
    assert caught.value.cause == "unreachable"
    assert dead_letters(tmp_path / "out.jsonl") == []


def test_a_host_that_does_not_resolve_is_named_as_such() -> None:
    """A DNS failure under the SDK's "timed out" reads as a name that does not resolve (no lookup made here)."""
    wrapped = TimeoutError("Request timed out.")
    wrapped.__cause__ = socket.gaierror(-2, "Name or service not known")
    problem = connection_problem(wrapped)
    assert problem is not None and problem[0].startswith("the host name does not resolve")
    assert connection_problem(TimeoutError("Request timed out.")) is None, "a real timeout stays a timeout"


@pytest.mark.parametrize(
    ("path", "shown"),
    [("/missing/v1", 'HTTP 404 with an HTML page ("404 Not Found")'), ("/v1", "HTTP 200 with an HTML page")],
    ids=["html-404", "html-200"],
)
def test_a_web_server_that_is_no_api_stops_the_run(
    sim: Any, web_server: http.server.ThreadingHTTPServer, tmp_path: Path, path: str, shown: str
) -> None:
    """A web server answering HTML (a 404 page, or a 200 page) stops the run after a few requests with what it
    sent and to check --base-url; no row is dead-lettered."""
    url = f"http://127.0.0.1:{web_server.server_address[1]}{path}"
    out = tmp_path / "out.jsonl"
    with pytest.raises(FatalApiError, match="is not an OpenAI-compatible API") as caught:
        label(sim, write_csv(tmp_path / "in.csv", reviews(50)), out, base_url=url, concurrency=2, retry=QUICK)
    assert shown in caught.value.message and "--base-url" in caught.value.message
    assert "does not serve model" not in caught.value.message
    assert dead_letters(out) == []
    assert web_server.posts <= 6  # type: ignore[attr-defined]


def test_a_dead_endpoint_in_a_fleet_is_left_alone_while_the_others_label(sim: Any, tmp_path: Path) -> None:
    """With several --base-url, one that refuses connections does not stop the run: the others label every row."""
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(30)), out, base_url=(dead, sim.base_url), retry=QUICK)
    assert summary.exit_code == 0, summary.render()
    assert len(ids_once(out)) == 30


def test_a_server_that_goes_away_after_answering_is_retried_as_before(tmp_path: Path) -> None:
    """Once a reply has come back, a refused connection is a passing trouble: retried, then dead-lettered."""

    async def attempt() -> Failed:
        client = LabelClient(
            prompt=Prompt(SENTIMENT),
            limiter=Limiter(LimitSettings(concurrency=1)),
            model="gpt-4o-mini",
            api_key="sk-test",
            base_url=f"http://127.0.0.1:{closed_port()}/v1",
            retry=RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=5.0),
        )
        client.stats.successes = 1  # the server answered before it went away
        try:
            result = await client.label(Row("r1", "fine", 1))
        finally:
            await client.aclose()
        assert isinstance(result, Failed)
        return result

    failed = asyncio.run(attempt())
    assert (failed.kind, failed.attempts) == ("connection", 3)
    assert "connection refused" in failed.message
