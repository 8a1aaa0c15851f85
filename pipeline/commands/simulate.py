"""`labelstream simulate`: the OpenAI-compatible test server on loopback."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.commands.args import count, number, positive_float, positive_int, seconds, share
from pipeline.errors import ExitCode, UsageError


def register(sub: Any) -> None:
    """Add the `simulate` subcommand."""
    sim = sub.add_parser("simulate", help="run the OpenAI-compatible test server on 127.0.0.1")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=count, default=8787, help="0 picks a free port (see --port-file)")
    sim.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    sim.add_argument("--latency-ms", type=seconds, default=200.0)
    sim.add_argument("--latency-jitter-ms", type=seconds, default=0.0)
    sim.add_argument(
        "--slots",
        type=positive_int,
        help="serve like a self-hosted server (vLLM's max_num_seqs): at most N requests at once, the rest wait "
        "in a FIFO queue, so latency grows with the load (default: no limit, latency independent of load)",
    )
    sim.add_argument(
        "--slot-cost",
        type=number(float, at_least=0),
        default=0.0,
        help="with --slots: batching cost, the share by which a request's latency grows when every slot is busy "
        "(0.5: 1.5x at a full batch; default: %(default)s)",
    )
    sim.add_argument("--rpm", type=positive_int, help="requests per minute before 429")
    sim.add_argument("--tpm", type=positive_int, help="tokens per minute before 429")
    sim.add_argument("--error-rate", type=share, default=0.0, help="share of requests answered 500/502/503")
    sim.add_argument("--hang-rate", type=share, default=0.0, help="share of requests never answered")
    sim.add_argument("--malformed-rate", type=share, default=0.0, help="share of replies that are unusable")
    sim.add_argument(
        "--logprobs",
        choices=("full", "ignore", "reject"),
        default="full",
        help="answer logprobs requests with logprobs, ignore them, or refuse them with a 400 (default: %(default)s)",
    )
    sim.add_argument(
        "--server",
        choices=("openai", "vllm"),
        default="openai",
        help="answer as OpenAI, or as vLLM where it differs: logprobs end with the stop token </s>, batch error "
        "lines in run_batch's shape (default: %(default)s)",
    )
    sim.add_argument(
        "--pad-whitespace", type=count, default=0, help="newlines a grammar-bound model pads its JSON with"
    )
    sim.add_argument(
        "--length-rate",
        type=share,
        default=0.0,
        help="share of rows answered with whitespace until max_tokens (finish_reason length), as a weak model under "
        "vLLM's default structured output does; the same rows every time",
    )
    sim.add_argument("--reasoning-tokens", type=count, default=0, help="hidden reasoning tokens billed per reply")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--window-seconds",
        type=positive_float,
        default=60.0,
        help="hold --rpm/--tpm over any this many seconds at their per-minute rate (R×W/60 in any W s, refused "
        "requests counted): 60 like OpenAI, 10 or 1 like Azure (with --quantum 0); headers still say per minute",
    )
    sim.add_argument(
        "--rate-headers",
        choices=["full", "retry-after", "none"],
        default="full",
        help="what a 429 and a reply say about limits: x-ratelimit-* and retry-after (full), retry-after only, "
        "or nothing, as some gateways do (default: %(default)s)",
    )
    sim.add_argument(
        "--quantum",
        type=seconds,
        default=1.0,
        help="the request limit also holds over every this many seconds at its per-minute rate (default 1; 0: off)",
    )
    sim.add_argument(
        "--gateway",
        choices=["none", "litellm"],
        default="none",
        help="answer like a LiteLLM proxy in front of the provider: renamed headers, its error shapes",
    )
    sim.add_argument(
        "--hold-seconds",
        type=seconds,
        default=0.0,
        help="with --gateway: hold a request over the limit this long before answering 429 (LiteLLM's retries)",
    )
    sim.add_argument(
        "--flex-unavailable-rate",
        type=share,
        default=0.0,
        help="share of flex requests answered 429 resource_unavailable",
    )
    sim.add_argument(
        "--batch-seconds", type=seconds, default=2.0, help="how long a batch takes from creation (default: 2)"
    )
    sim.add_argument("--batch-error-rate", type=share, default=0.0, help="share of batch requests that fail (500)")
    sim.add_argument(
        "--batch-window-seconds",
        type=positive_float,
        default=86_400.0,
        help="the completion window: requests not done by then expire (default: 24 h)",
    )
    sim.add_argument(
        "--model-quality",
        type=model_quality,
        metavar="MODEL=Q,...",
        help="a simulation of weaker models: MODEL agrees with the simulator's judge on a share Q of rows, e.g. "
        "gpt-4o-mini=0.8,gpt-4.1-mini=0.95 (default: every model always agrees); for demos of labelstream compare",
    )
    sim.add_argument("--api-key", help="require this bearer key (default: accept any)")
    sim.add_argument("--models", help="comma-separated models to serve (default: any)")
    sim.set_defaults(handler=run)


def model_quality(text: str) -> dict[str, float]:
    """`gpt-4o-mini=0.8,gpt-4.1-mini=0.95`: each model's share of rows judged as the simulator's judge does."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, value = part.rpartition("=")
        if not sep or not model.strip():
            raise argparse.ArgumentTypeError(f"expected MODEL=Q pairs such as gpt-4o-mini=0.8, got {part!r}")
        out[model.strip()] = share(value)
    return out


def run(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Serve until Ctrl-C or SIGTERM."""
    from pipeline.simulator import SimulatorConfig, serve  # noqa: PLC0415 - aiohttp server only here

    try:
        config = SimulatorConfig(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            rpm=args.rpm,
            tpm=args.tpm,
            error_rate=args.error_rate,
            hang_rate=args.hang_rate,
            malformed_rate=args.malformed_rate,
            length_rate=args.length_rate,
            seed=args.seed,
            logprobs=args.logprobs,
            server=args.server,
            pad_whitespace=args.pad_whitespace,
            reasoning_tokens=args.reasoning_tokens,
            window_seconds=args.window_seconds,
            quantum=args.quantum,
            rate_headers=args.rate_headers,
            gateway=args.gateway,
            hold_seconds=args.hold_seconds,
            flex_unavailable_rate=args.flex_unavailable_rate,
            batch_seconds=args.batch_seconds,
            batch_error_rate=args.batch_error_rate,
            batch_window_seconds=args.batch_window_seconds,
            slots=args.slots,
            slot_cost=args.slot_cost,
            api_key=args.api_key,
            model_quality=args.model_quality,
            models=frozenset(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None,
        )
        serve(config, host=args.host, port=args.port, port_file=args.port_file)
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    return ExitCode.OK
