"""Token estimates for the TPM limiter and for --dry-run cost estimates."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


class TokenEstimator:
    """Estimates prompt tokens from characters: ~4 ASCII characters per token, ~1 token per CJK character."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.exact = False

    def count(self, text: str) -> int:
        """Estimated tokens in `text`."""
        return _estimate(text)

    def count_messages(self, messages: Iterable[Mapping[str, str]]) -> int:
        """Estimated prompt tokens of a chat request (content plus a few tokens of framing per message)."""
        return sum(self.count(m.get("content") or "") + 4 for m in messages) + 3


def _estimate(text: str) -> int:
    chars = len(text)
    extra = len(text.encode("utf-8", "surrogatepass")) - chars
    if extra == 0:
        return math.ceil(chars / 4)
    # Multi-byte characters (Hangul, CJK, emoji) are mostly 3-4 bytes and cost about a token each.
    wide = min(chars, extra // 2)
    return math.ceil((chars - wide) / 4 + wide * 0.9)
