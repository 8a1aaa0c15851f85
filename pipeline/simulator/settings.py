"""What the simulator is told (its settings) and what it remembers (its counters)."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

EVENTS_KEPT: Final = 100_000
RATE_HEADERS: Final = ("full", "retry-after", "none")
LOGPROBS_MODES: Final = ("full", "ignore", "reject")
SERVERS: Final = ("openai", "vllm")
# What vLLM lists last in `logprobs.content` (the model's end-of-sequence token) and leaves out of the text.
VLLM_STOP_TOKEN: Final = "</s>"  # noqa: S105 - a token of text, not a secret


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulator behaves; the three rates are per-request probabilities.

    rpm, tpm: sliding 60-second limits on requests and tokens (None: unlimited).
    seed: seeds the random faults and the latency jitter (labels depend on the input only).
    api_key: when set, requests must carry `Authorization: Bearer <api_key>`.
    models: when set, other models get 404 `model_not_found`.
    hang_seconds: how long a hang holds the reply unless the client goes away first.
    logprobs: "full" answers `logprobs: true` with token logprobs; "ignore" sends none (logprobs: null), as
        some servers do; "reject" refuses the parameter with a 400, as OpenAI's reasoning models do.
    server: "openai" answers as OpenAI does; "vllm" as vLLM does where it differs: `logprobs.content` ends with
        the stop token (`</s>`) that the message text leaves out, and the Batch API's error lines take the shape of
        vLLM `run_batch`'s (`response.body` null, the message under `error.error`).
    pad_whitespace: newlines a grammar-constrained model puts into its JSON before the closing brace (kept in the
        text and in the logprobs, as vLLM keeps them).
    reasoning_tokens: hidden reasoning tokens billed with every reply (completion_tokens includes them, up to
        the request's max_completion_tokens), as reasoning models bill them.
    window_seconds: length of the sliding rate windows; each limit holds over any this many seconds at its
        per-minute rate (rpm 600 over 10 s admits 100 in any 10 s, refused requests counted), while headers keep
        speaking per minute. 60 is OpenAI's minute; 10 or 1 (with quantum 0) a provider like Azure that holds its
        limits over shorter windows; tests also shorten it to see a whole window in seconds, not minutes.
    quantum: the request limit also holds over every this many seconds, at its per-minute rate (1 s: a 600 RPM
        limit takes at most 10 requests in any second), as OpenAI does; 0 turns the short interval off.
    tokenizer: "auto" counts prompt tokens with the model's BPE when `bpe-openai` is installed (as the API does),
        "estimate" always uses ceil(characters / 4) + 3 a message.
    gateway: "litellm" answers like a LiteLLM proxy in front of this provider (see gateway.py): renamed rate
        headers, gateway-shaped errors, and over-limit requests held up to `hold_seconds` before a 429.
    rate_headers: "full" (x-ratelimit-* on every reply, retry-after on 429s), "retry-after" (only that, on
        429s) or "none" (a bare 429), to imitate providers and gateways that say less.
    flex_unavailable_rate: share of `service_tier: "flex"` requests answered 429 `resource_unavailable`.
    length_rate: share of rows (picked by their text, so every request for a row alike) answered as a weak model
        under vLLM's default structured output answers: whitespace until max_tokens, finish_reason "length".
    batch_seconds: how long a batch takes from creation to its last request (requests finish evenly over it;
        read at every look, so lowering it lets batches already running finish at once).
    batch_error_rate: share of batch requests answered with an error (500) in the error file.
    batch_window_seconds: the completion window ("24h"); requests not done by then expire (`batch_expired`).
    batch_cancel_seconds: how long a cancelled batch stays `cancelling`.
    upload_reply_seconds, create_reply_seconds, content_reply_seconds: hold the reply of a file upload, a
        batch creation or a file download this long after the work is done (crash tests kill clients there).
    slots: serve like a self-hosted server (vLLM's max_num_seqs): at most this many chat requests are worked on
        at once, the rest wait in an unbounded FIFO queue, so latency grows with the load past the knee (see
        slots.py); None: every request is served at once (a provider whose latency does not depend on load).
    slot_cost: batching cost with `slots`: a request's latency grows by this share when every slot is busy
        (0.5: 1.5× the latency at a full batch), so throughput rises ever less steeply up to the knee.
    model_quality: a simulation of weaker and stronger models: model → the share of rows (picked by a hash of the
        model and the text) on which it agrees with the judge; on the others the judge's best label is ruled out.
        Models not named always agree. Not a measurement of any real model.
    """

    latency_ms: float = 200.0
    latency_jitter_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    error_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 0
    api_key: str | None = field(default=None, repr=False)  # kept out of reprs and tracebacks
    models: frozenset[str] | None = None
    hang_seconds: float = 3600.0
    window_seconds: float = 60.0
    quantum: float = 1.0
    rate_headers: str = "full"
    tokenizer: str = "auto"
    gateway: str = "none"
    hold_seconds: float = 0.0
    logprobs: str = "full"
    server: str = "openai"
    pad_whitespace: int = 0
    reasoning_tokens: int = 0
    flex_unavailable_rate: float = 0.0
    length_rate: float = 0.0
    batch_seconds: float = 2.0
    batch_error_rate: float = 0.0
    batch_window_seconds: float = 86_400.0
    batch_cancel_seconds: float = 0.0
    upload_reply_seconds: float = 0.0
    create_reply_seconds: float = 0.0
    content_reply_seconds: float = 0.0
    slots: int | None = None
    slot_cost: float = 0.0
    model_quality: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.rate_headers not in RATE_HEADERS:
            raise ValueError(f"rate_headers must be one of {', '.join(RATE_HEADERS)}, got {self.rate_headers!r}")
        if self.gateway not in ("none", "litellm"):
            raise ValueError(f"gateway must be none or litellm, got {self.gateway!r}")
        if self.tokenizer not in ("auto", "estimate"):
            raise ValueError(f"tokenizer must be auto or estimate, got {self.tokenizer!r}")
        if not 0 <= self.quantum <= 60:
            raise ValueError(f"quantum must lie in 0..60 seconds, got {self.quantum}")
        if self.window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {self.window_seconds}")
        for name in _SECONDS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("rpm", "tpm", "slots"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value}")
        if self.logprobs not in LOGPROBS_MODES:
            raise ValueError(f"logprobs must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs!r}")
        if self.server not in SERVERS:
            raise ValueError(f"server must be one of {', '.join(SERVERS)}, got {self.server!r}")
        if not 0 <= self.pad_whitespace <= 1000:
            raise ValueError(f"pad_whitespace must lie in 0..1000, got {self.pad_whitespace}")
        if self.reasoning_tokens < 0:
            raise ValueError(f"reasoning_tokens must not be negative, got {self.reasoning_tokens}")
        rates = (self.error_rate, self.hang_rate, self.malformed_rate)
        if any(not 0.0 <= rate <= 1.0 for rate in rates) or sum(rates) > 1.0:
            raise ValueError(f"error, hang and malformed rates must lie in 0..1 and sum to at most 1, got {rates}")
        for name in ("flex_unavailable_rate", "batch_error_rate", "length_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in 0..1, got {getattr(self, name)}")
        if self.batch_window_seconds <= 0:
            raise ValueError(f"batch_window_seconds must be positive, got {self.batch_window_seconds}")
        for model, quality in (self.model_quality or {}).items():
            if isinstance(quality, bool) or not isinstance(quality, int | float) or not 0.0 <= quality <= 1.0:
                raise ValueError(f"model_quality of {model!r} must lie in 0..1, got {quality!r}")

    def replace(self, **changes: Any) -> SimulatorConfig:
        """A copy with `changes` applied, type-checked as JSON from `/control/config` (models may be a list)."""
        for name, value in changes.items():
            expected = _CONFIG_TYPES.get(name)
            if expected is None:
                raise ValueError(f"unknown simulator setting {name!r}; known: {sorted(_CONFIG_TYPES)}")
            if isinstance(value, bool) or not isinstance(value, expected):
                raise TypeError(f"simulator setting {name!r} has the wrong type: {value!r}")
        if isinstance(models := changes.get("models"), list | tuple | set):
            changes["models"] = frozenset(str(model) for model in models)
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON, with the API key reduced to whether one is set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["api_key"] = "<set>" if self.api_key is not None else None
        out["models"] = sorted(self.models) if self.models is not None else None
        out["model_quality"] = dict(self.model_quality) if self.model_quality is not None else None
        return out


_SECONDS: Final = (
    "latency_ms",
    "latency_jitter_ms",
    "hang_seconds",
    "batch_seconds",
    "batch_cancel_seconds",
    "upload_reply_seconds",
    "create_reply_seconds",
    "content_reply_seconds",
    "slot_cost",
)
_NUMBER = (int, float)
_CONFIG_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "latency_ms": _NUMBER,
    "latency_jitter_ms": _NUMBER,
    "rpm": (int, type(None)),
    "tpm": (int, type(None)),
    "error_rate": _NUMBER,
    "hang_rate": _NUMBER,
    "malformed_rate": _NUMBER,
    "seed": (int,),
    "api_key": (str, type(None)),
    "models": (list, tuple, set, frozenset, type(None)),
    "hang_seconds": _NUMBER,
    "window_seconds": _NUMBER,
    "quantum": _NUMBER,
    "rate_headers": (str,),
    "tokenizer": (str,),
    "gateway": (str,),
    "hold_seconds": _NUMBER,
    "logprobs": (str,),
    "server": (str,),
    "pad_whitespace": (int,),
    "reasoning_tokens": (int,),
    "flex_unavailable_rate": _NUMBER,
    "length_rate": _NUMBER,
    "batch_seconds": _NUMBER,
    "batch_error_rate": _NUMBER,
    "batch_window_seconds": _NUMBER,
    "batch_cancel_seconds": _NUMBER,
    "upload_reply_seconds": _NUMBER,
    "create_reply_seconds": _NUMBER,
    "content_reply_seconds": _NUMBER,
    "slots": (int, type(None)),
    "slot_cost": _NUMBER,
    "model_quality": (dict, type(None)),
}


class Exchange:
    """What happened to one chat request, filled in as it goes and recorded even if the client leaves."""

    __slots__ = ("arrived", "completion_tokens", "fault", "ok", "prompt_tokens", "status")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        # nginx's "client closed request": what stays recorded when the handler is cancelled.
        self.status = 499
        self.fault: str | None = None
        self.ok = False
        self.prompt_tokens = 0
        self.completion_tokens = 0


class Stats:
    """Counters for /v1/chat/completions; plain attributes because every request updates them."""

    __slots__ = (
        "by_fault",
        "by_status",
        "completed_ok",
        "completion_tokens",
        "events",
        "in_flight",
        "max_in_flight",
        "prompt_tokens",
        "rate_limited",
        "requests",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.events: deque[tuple[float, int, str | None]] = deque(maxlen=EVENTS_KEPT)
        self.clear()

    def clear(self) -> None:
        """Zero the counters; `in_flight` is a gauge and stays, since requests under way still finish."""
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.by_fault: dict[str, int] = {}
        self.completed_ok = 0
        self.max_in_flight = self.in_flight
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rate_limited = {"requests": 0, "tokens": 0}
        self.events.clear()

    def record(self, ex: Exchange) -> None:
        """Count a finished (or abandoned) request."""
        self.by_status[ex.status] = self.by_status.get(ex.status, 0) + 1
        if ex.fault is not None:
            self.by_fault[ex.fault] = self.by_fault.get(ex.fault, 0) + 1
        if ex.ok:
            self.completed_ok += 1
        self.prompt_tokens += ex.prompt_tokens
        self.completion_tokens += ex.completion_tokens
        self.events.append((ex.arrived, ex.status, ex.fault))

    def to_json(self, *, events: bool) -> dict[str, Any]:
        """The counters as JSON; events as [seconds since start at arrival, status, fault kind or null]."""
        out: dict[str, Any] = {
            "requests": self.requests,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "by_fault": dict(self.by_fault),
            "completed_ok": self.completed_ok,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rate_limited": dict(self.rate_limited),
        }
        if events:
            out["events"] = [list(event) for event in self.events]
        return out
