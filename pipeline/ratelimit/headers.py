"""What a provider's reply says about its limits: `x-ratelimit-*`, `retry-after`, and how long to wait.

Gateways rename these headers. LiteLLM passes an upstream's `retry-after`, `retry-after-ms` and
`x-ratelimit-*` on as `llm_provider-retry-after` and so on, and its own 429s carry only
`llm_provider-retry-after`; Azure OpenAI adds `x-ms-retry-after-ms`. `provider_view` folds those names onto the
plain ones, so one pause logic serves every gateway.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Final

# Prefixes gateways put before the headers a provider sent (the plain header wins when both are present).
_PREFIXES: Final = ("llm_provider-", "x-ms-")


def provider_view(headers: Mapping[str, str]) -> Mapping[str, str]:
    """`headers`, with gateway-prefixed rate-limit headers also readable under their plain names."""
    renamed = {}
    for name, value in headers.items():
        lower = name.lower()
        for prefix in _PREFIXES:
            if lower.startswith(prefix):
                renamed[lower[len(prefix) :]] = value
    if not renamed:
        return headers
    merged = {name.lower(): value for name, value in headers.items()}
    for name, value in renamed.items():
        merged.setdefault(name, value)
    return merged


def number(value: str | None) -> float | None:
    """A header's numeric value, or None when it is missing or not a number."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for: `retry-after-ms`, `retry-after` (seconds or HTTP date), else `x-ratelimit-reset-*`
    (plain or as a gateway renamed them)."""
    headers = provider_view(headers)
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [parse_duration(headers.get(h, "")) for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def parse_duration(text: str) -> float | None:
    """Parse OpenAI's reset durations such as "1s", "6m0s", "120ms", "1h2m3.5s" into seconds."""
    text = text.strip()
    if not text:
        return None
    total, digits = 0.0, ""
    i = 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            digits += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not digits:
            return None
        try:
            total += float(digits) * units[unit]
        except ValueError:
            return None
        digits = ""
        i += len(unit)
    if digits:  # a bare number means seconds
        try:
            total += float(digits)
        except ValueError:
            return None
    return total
