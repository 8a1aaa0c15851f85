"""How the simulator counts prompt tokens: the model's own BPE when `bpe-openai` is installed, else an estimate.

The real API counts Hangul, CJK and emoji at about one token a character, not four characters a token, so a
simulator that estimates would let a client's TPM pacing look better than it is. The encodings load once per
process (about a second), on the first request for an OpenAI model.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Final

# The one model→encoding table: the client counts with the same encodings the simulator charges.
from pipeline.api.tokens import encoding_name

_PER_MESSAGE: Final = 3
_CACHE_SIZE: Final = 512  # system prompts and few-shot examples repeat in every request

_lock = threading.Lock()
_encoders: dict[str, Callable[[str], list[int]] | None] = {}


def _encoder(name: str) -> Callable[[str], list[int]] | None:
    with _lock:
        if name not in _encoders:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    import bpe_openai  # noqa: PLC0415 - optional and heavy

                    _encoders[name] = bpe_openai.get_encoding(name).encode
            except Exception:  # noqa: BLE001 - not installed or broken: the estimate serves
                _encoders[name] = None
        return _encoders[name]


def estimate(text: str) -> int:
    """ceil(characters / 4): the count when no encoding is known."""
    return -(-len(text) // 4)


class TokenCounter:
    """Counts a request's prompt tokens; `exact=False` always estimates (for tests that pin numbers)."""

    def __init__(self, *, exact: bool = True) -> None:
        self.exact = exact
        self._cache: dict[tuple[str, str], int] = {}

    def prompt_tokens(self, model: str, contents: Sequence[str]) -> int:
        """Tokens of the message contents plus the per-message framing."""
        encode = None
        name = encoding_name(model) if self.exact else None
        if name is not None:
            encode = _encoder(name)
        if encode is None:
            return estimate("".join(contents)) + _PER_MESSAGE * len(contents)
        total = 0
        for content in contents:
            key = (name or "", content)
            count = self._cache.get(key)
            if count is None:
                count = len(encode(content))
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = count
            total += count
        return total + _PER_MESSAGE * len(contents)
