"""Automatic prompt caching as OpenAI does it: a repeated prompt prefix of 1,024 tokens or more is served from
cache, in steps of 128 tokens, for a few minutes after its last use; `usage.prompt_tokens_details.cached_tokens`
says how much. Only a prefix that is byte-for-byte the same hits, so a prompt must put its shared part first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Any, Final

import orjson

MIN_TOKENS: Final = 1024
STEP: Final = 128
TTL_SECONDS: Final = 300.0
_KEPT: Final = 4096


class PromptCache:
    """Remembers recent prompt prefixes (every message but the last) per model."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: dict[bytes, float] = {}

    def cached_tokens(self, model: str, messages: Sequence[Any]) -> int:
        """Tokens of this request served from cache (0 on a first sight or a short prefix); remembers the prefix."""
        prefix = messages[:-1]
        chars = sum(
            len(m.get("content") or "") for m in prefix if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        tokens = -(-chars // 4) + 3 * len(prefix)  # the same estimate as the prompt's usage
        if tokens < MIN_TOKENS:
            return 0
        key = blake2b(model.encode() + b"\0" + orjson.dumps(prefix), digest_size=16).digest()
        now = self._clock()
        last = self._seen.pop(key, None)
        if len(self._seen) >= _KEPT:
            self._seen.clear()
        self._seen[key] = now
        if last is None or now - last > TTL_SECONDS:
            return 0
        return tokens // STEP * STEP

    def clear(self) -> None:
        """Forget every prefix."""
        self._seen.clear()
