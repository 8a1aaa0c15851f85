"""Real servers for the compat tier: start one on a free loopback port, wait for its health check, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ..helpers import ROOT

COMPAT_VENV = Path(os.environ.get("COMPAT_VENV", ROOT / ".venv-compat"))
MODEL_DIR = COMPAT_VENV / "tiny-model"
SERVED_NAME = "tiny"
# The model's context: small, so a context-length row is cheap to make.
MAX_MODEL_LEN = 2048
# Slots: vLLM runs at most this many sequences at once and queues the rest, as a production server does (128-256);
# small, so that "auto concurrency against the server's slots" needs only a few hundred rows on 2 shared cores.
MAX_NUM_SEQS = 16
# vLLM's first start here took ~80 s (engine profile + warm-up) on 2 busy cores: bounded, but generous.
START_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET (any HTTP status; OSError when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback URLs built here
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Server:
    """A server process in its own process group (vLLM forks an engine process; both stop and resume together)."""

    def __init__(self, name: str, argv: Sequence[str], health_url: str, log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.health_url, self.log_path, self.env = name, list(argv), health_url, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        """Start and poll the health URL until it answers 200 (bounded; the log tail is in the failure)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if http_get(self.health_url, timeout=2)[0] == 200:
                    return self
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)  # polling a readiness endpoint; the deadline above bounds it
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        """The server's process id (its process group has the same id)."""
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the server and every process it started (SIGSTOP/SIGCONT a whole host's worth)."""
        os.killpg(self.pid, sig)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it is still there after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGCONT, 0.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            if wait:
                try:
                    self.proc.wait(timeout=wait)
                    return
                except subprocess.TimeoutExpired:
                    continue

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server: no API keys or endpoints inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_", "VLLM_"))}
    env.update(extra)
    return env


class VLLM(Server):
    """`vllm serve` of the tiny model on CPU, with its served alias, context and slots."""

    def __init__(self, log: Path, *, whitespace: bool = False, max_num_seqs: int = MAX_NUM_SEQS) -> None:
        self.port = free_port()
        argv = [
            str(COMPAT_VENV / "bin" / "vllm"),
            "serve",
            str(MODEL_DIR),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-num-seqs",
            str(max_num_seqs),
            "--dtype",
            "float32",
        ]
        if not whitespace:
            # vLLM's default grammar lets JSON have any whitespace; a weak model then pads until max_tokens
            # (captured in tests/data/compat/vllm_reply_length_whitespace.json). Servers for small models turn it
            # off like this; the whitespace=True server keeps the default for the test of that failure.
            argv += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
        env = server_env(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: plenty for 2,048-token sequences, small for a shared box
            VLLM_CPU_OMP_THREADS_BIND="nobind",  # the 2 cores are shared with other work: pin nothing
            VLLM_NO_USAGE_STATS="1",
            VLLM_DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        super().__init__("vllm", argv, f"http://127.0.0.1:{self.port}/health", log, env)

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint."""
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_requests(self) -> int:
        """Chat requests the server has answered (any status), from its Prometheus metrics."""
        _, text = http_get(f"http://127.0.0.1:{self.port}/metrics")
        return round(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("http_requests_total{") and 'handler="/v1/chat/completions"' in line
            )
        )


class LiteLLM(Server):
    """A LiteLLM proxy in front of an OpenAI-compatible upstream (labelstream's simulator)."""

    MASTER_KEY = "sk-compat-litellm-master-0000"  # a local test key for a proxy that lives for one test module

    def __init__(self, log: Path, upstream: str, *, num_retries: int | None = None) -> None:
        self.port = free_port()
        config = log.with_suffix(".yaml")
        router = "" if num_retries is None else f"router_settings:\n  num_retries: {num_retries}\n"
        config.write_text(
            "model_list:\n"
            "  - model_name: gpt-4o-mini\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o-mini\n"
            f"      api_base: {upstream}\n"
            "      api_key: sk-upstream-test\n"
            f"{router}"
            "general_settings:\n"
            f"  master_key: {self.MASTER_KEY}\n",
            encoding="utf-8",
        )
        argv = [str(COMPAT_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--num_workers", "1"]
        # Offline: LiteLLM fetches its model cost map from the network unless told to use its bundled copy.
        env = server_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", NO_DOCS="True")
        super().__init__("litellm", argv, f"http://127.0.0.1:{self.port}/health/liveliness", log, env)

    @property
    def base_url(self) -> str:
        """The proxy's OpenAI-compatible endpoint."""
        return f"http://127.0.0.1:{self.port}/v1"
