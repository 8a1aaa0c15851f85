"""The loopback rule: which hosts are this machine (a key is optional there; the simulator listens only there)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` is this machine: `localhost`, any of 127.0.0.0/8, or ::1 (brackets allowed)."""
    if not host:
        return False
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str | None) -> bool:
    """Whether an endpoint URL points at this machine."""
    if not url:
        return False
    try:
        return is_loopback_host(urlparse(url).hostname)
    except ValueError:  # a malformed URL (e.g. an unclosed IPv6 bracket) is no loopback
        return False
