"""Token estimates for the TPM limiter and for --dry-run cost estimates.

Two ways to count, chosen deliberately:
- a character estimate (~4 ASCII characters a token, ~1 token a Hangul/CJK character), calibrated during the
  run from the `usage.prompt_tokens` the API reports, so it converges on the provider's own count; and
- the exact BPE count from `bpe-openai` (offline o200k/cl100k encodings; tiktoken would download them),
  opt-in with `--exact-tokens` (extra `labelstream[tokens]`) and used only when a TPM limit is in force and
  the model's encoding is known. Importing it and loading an encoding costs ~140 MB of RSS and ~0.9 s
  (measured here): more than the whole pipeline otherwise needs, so it is not the default, and it loads in
  a thread while the estimate serves the first requests.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping

from pipeline.errors import UsageError

_O200K = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_CL100K = ("gpt-4", "gpt-3.5", "gpt-35")


def encoding_name(model: str) -> str | None:
    """The BPE encoding of an OpenAI model family, or None for other models (vLLM, fine-tunes of others)."""
    name = model.removeprefix("ft:").lower()
    if name.startswith(_O200K):
        return "o200k_base"
    if name.startswith(_CL100K):
        return "cl100k_base"
    return None


def require_exact_tokens() -> None:
    """Refuse --exact-tokens when `bpe-openai` is missing, instead of quietly counting with the estimate."""
    if importlib.util.find_spec("bpe_openai") is None:
        raise UsageError(
            "--exact-tokens counts tokens with bpe-openai, which is not installed: pip install 'labelstream[tokens]' "
            "(~140 MB), or drop --exact-tokens to count with the calibrated estimate."
        )


def estimate(text: str) -> int:
    """Tokens in `text` by character classes (uncalibrated)."""
    chars = len(text)
    extra = len(text.encode("utf-8", "surrogatepass")) - chars
    if extra == 0:
        return math.ceil(chars / 4)
    # Multi-byte characters (Hangul, CJK, emoji) are mostly 3-4 bytes and cost about a token each.
    wide = min(chars, extra // 2)
    return math.ceil((chars - wide) / 4 + wide * 0.9)


class TokenEstimator:
    """Counts a request's prompt tokens: the fixed prefix (system prompt, examples) plus one row's text.

    Exact once a BPE encoding is loaded, else the character estimate scaled by what the API reported.
    """

    def __init__(self, model: str, prefix: Iterable[Mapping[str, str]] = ()) -> None:
        self.model = model
        self.scale = 1.0  # provider tokens per estimated token, learned from usage
        self._samples = 0
        self._prefix = [m.get("content") or "" for m in prefix]
        # Framing: ~4 tokens a message, 3 to prime the reply; the row's own message is the +1.
        self._framing = 4 * (len(self._prefix) + 1) + 3
        self._prefix_estimate = sum(estimate(c) for c in self._prefix)
        self._prefix_exact = 0
        self._encode: Callable[[str], list[int]] | None = None
        self._loader: threading.Thread | None = None

    @property
    def exact(self) -> bool:
        """Whether counts come from the model's own BPE encoding."""
        return self._encode is not None

    def prompt_tokens(self, text: str) -> int:
        """Prompt tokens of the request that labels `text`."""
        encode = self._encode
        if encode is not None:
            return self._prefix_exact + len(encode(text)) + self._framing
        return math.ceil((self._prefix_estimate + estimate(text) + self._framing) * self.scale)

    def observe(self, text: str, reported: int) -> None:
        """Fold one reply's `usage.prompt_tokens` into the scale of the character estimate."""
        if self._encode is not None or reported <= 0:
            return
        ratio = reported / (self._prefix_estimate + estimate(text) + self._framing)
        self._samples += 1
        weight = max(0.05, 1 / self._samples)  # a plain mean at first, then a slow moving average
        self.scale += weight * (ratio - self.scale)

    def load_exact(self) -> threading.Thread | None:
        """Start loading the model's BPE encoding in a thread (once); None when the model's encoding is unknown."""
        name = encoding_name(self.model)
        if name is None:
            return None
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, args=(name,), name="labelstream-bpe", daemon=True)
            self._loader.start()
        return self._loader

    def _load(self, name: str) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # bpe-openai's own use of importlib APIs
                import bpe_openai  # noqa: PLC0415 - optional and heavy: only with --exact-tokens under a TPM limit

                encode = bpe_openai.get_encoding(name).encode
        except Exception:  # noqa: BLE001 - not installed or broken: the calibrated estimate keeps serving
            return
        self._prefix_exact = sum(len(encode(c)) for c in self._prefix)
        self._encode = encode
