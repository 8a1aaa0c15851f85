"""An OpenAI-compatible chat completions server on loopback, for the demo, the tests and the benchmarks.

Endpoints:
    POST /v1/chat/completions   a deterministic label honouring `response_format`, with latency (with `slots`,
                                a self-hosted server's: a fixed number at once, the rest queued, `slots.py`),
                                sliding-window RPM/TPM limits (429 + retry-after) and faults
    GET  /v1/models             the model list
    POST /v1/files              upload (multipart: file, purpose); GET /v1/files/{id}, GET .../content, DELETE
    POST /v1/batches            a batch over an uploaded request file; GET /v1/batches (newest first, limit,
                                after), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
    GET  /stats                 counters, window and slot use, CPU time, events (`?events=0` leaves them out)
    POST /stats/reset           zero the counters
    GET|POST|DELETE /control/faults
                                faults for the next requests, in order (POST appends; "replace": true first clears):
                                {"faults": [{"kind": "status", "status": 429, "retry_after": 1, "count": 2},
                                            {"kind": "hang", "match": "row-7", "count": -1}]}
    GET|POST /control/config    change settings, e.g. {"rpm": 600, "latency_ms": 50}; resets the windows
    POST /control/reset         back to the starting config, with no stats, faults, window use, files or batches
    GET  /control/batches       submissions per custom_id (how often each went out in a batch), batches, files

Replies: with a `json_schema` response_format, an instance of its schema (same text, same reply). An enum
of the labels the system prompt describes ("- label: description") takes the label whose description and
few-shot examples share the most with the text (`judge.py`); other enums, and texts that share nothing, are
chosen by a hash of the last user message (an array of an enum gives 1-2 distinct values). Without a schema:
{"label": "positive" | "negative" | "neutral"}. `logprobs: true` (with `top_logprobs` 0..20) gets token
logprobs whose label token carries the judge's probability and its rivals (config `logprobs`: "ignore"
sends none, "reject" answers 400 as reasoning models do; `server` "vllm" ends them with the stop token `</s>`,
and `pad_whitespace` pads the JSON with newlines, as vLLM under a grammar does). Usage: prompt =
ceil(characters / 4) + 3 per message, completion = ceil(len(content) / 4) plus `reasoning_tokens`; a prompt
prefix of 1,024+ tokens seen in the last 5 minutes is reported as cached in steps of 128 (`caching.py`). A
request's TPM cost is its prompt plus max_completion_tokens (or max_tokens, or the completion). stream=true is
refused with a 400.

Fault kinds: status, hang, reset, close_after_headers, slow_body, delay (the exchange itself) and
not_json, bad_json_content, label_outside, empty_content, extra_text, length, content_filter,
refusal (a 200 whose reply is no usable label; `malformed_rate` draws from these), and pad ("{" and
whitespace until max_tokens, finish_reason "length", every token billed: a weak model under vLLM's default
structured output; `length_rate` picks that share of rows by their text, for every request). Every fault takes
count (default 1, -1 forever) and match (apply only if the last user message contains it); `status`
takes status, message, code, type, retry_after, retry_after_ms, headers; hang, delay and slow_body take
seconds; not_json takes content_type. Scripted faults come before the rate windows; random ones after.

Batches (`batches.py`): each request of an accepted batch is answered at creation by the chat logic
(scripted faults apply; `batch_error_rate` adds 500s) and finishes in shuffled order, evenly over
`batch_seconds`; past `batch_window_seconds` a batch expires (unfinished requests listed with code
`batch_expired`); a cancelled one keeps what finished. `service_tier: "flex"` is echoed in the reply, and
`flex_unavailable_rate` refuses that share of flex requests with 429 `resource_unavailable`.

Events in /stats are [seconds since start at arrival, status, fault kind or null]; status 0 means the
simulator reset the connection, 499 that the client left before the reply.

Run it with `Simulator` on your own loop, `SimulatorThread` from synchronous code and tests, or `serve`.
"""

from pipeline.simulator.faults import FAULT_KINDS, MALFORMED_KINDS, Fault
from pipeline.simulator.replies import DEFAULT_LABELS, OUTSIDE_LABEL
from pipeline.simulator.runner import SimulatorThread, serve
from pipeline.simulator.server import DEFAULT_MODELS, Simulator
from pipeline.simulator.settings import SimulatorConfig
from pipeline.simulator.windows import RateLimits, RateWindow, format_duration

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_MODELS",
    "FAULT_KINDS",
    "MALFORMED_KINDS",
    "OUTSIDE_LABEL",
    "Fault",
    "RateLimits",
    "RateWindow",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "format_duration",
    "serve",
]
