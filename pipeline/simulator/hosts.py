"""Where the simulator may listen (loopback only) and the URL a client gives to reach it."""

from __future__ import annotations

from pipeline.api.loopback import is_loopback_host


def loopback_host(host: str) -> str:
    """Return `host` if it is a loopback address ("localhost" becomes 127.0.0.1), else raise ValueError."""
    if host == "localhost":
        return "127.0.0.1"  # one address, so that port 0 binds one port
    if not is_loopback_host(host):
        raise ValueError(f"the simulator only listens on loopback (127.0.0.1, ::1, localhost), not {host!r}")
    return host


def base_url_of(host: str, port: int) -> str:
    """The URL to give an OpenAI client for a simulator on `host:port`."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"
