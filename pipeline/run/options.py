"""What a labeling run needs, resolved from flags or keyword arguments, in groups: I/O, limits, retry, checkpoint.

`RunOptions.build` is the one place that turns flat settings (CLI flags, `label_csv` keywords) into the
groups; nothing here imports the SDK, so the CLI can build options without paying for it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal

from pipeline.api.loopback import is_loopback_url
from pipeline.api.tokens import require_exact_tokens
from pipeline.errors import UsageError
from pipeline.input.location import is_uri
from pipeline.input.shards import Shard
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.sinks.storage import as_path
from pipeline.task.config import TaskConfig

ProgressMode = Literal["auto", "log", "off"]
FLEX_TIMEOUT: Final = 900.0  # seconds per request with service_tier="flex": its requests may wait in line for minutes


@dataclass(frozen=True, slots=True)
class IoOptions:
    """Where rows come from and where labels go, and how to read the input."""

    input: Path | str  # a str only for a URI (s3://…), which Path would mangle
    output: Path
    input_format: str | None = None  # csv, tsv, jsonl or parquet; None: by the input's extension
    encoding: str = "utf-8"
    delimiter: str | None = None
    require_id_column: bool = False  # the id column was named explicitly: its absence is an error, not a fallback


@dataclass(frozen=True, slots=True)
class CheckpointOptions:
    """How often the writer saves: every `rows` rows or `seconds` seconds (None: the sink's default)."""

    rows: int | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything a run needs; build it with `RunOptions.build` from flat settings."""

    io: IoOptions
    config: TaskConfig
    limits: LimitSettings = field(default_factory=LimitSettings.automatic)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    api_key: str | None = None
    base_url: str | tuple[str, ...] | None = None  # several: a fleet of servers, spread by least in flight
    max_rows: int | None = None  # label at most this many rows not yet in the sink (--limit)
    force: bool = False
    restart: bool = False  # --skip_labeled False: move the old sink aside and start over
    relabel_changed: bool = False  # relabel done rows whose text changed since they were labeled
    dedupe: bool = True  # the online engine sends each distinct text once; other rows copy it (run/dedupe.py)
    dedupe_match: Literal["exact", "normalized"] = "exact"  # normalized: texts equal up to whitespace and case
    progress: ProgressMode = "auto"  # auto: a bar on a terminal, log lines otherwise; off: --quiet
    grace_seconds: float = 10.0
    exact_tokens: bool = False  # count prompt tokens with bpe-openai under a TPM limit (extra: labelstream[tokens])
    max_cost: float | None = None  # USD this run may spend (--max-cost): refused above it before, stopped during
    review_below: float | None = None  # write rows with a lower confidence to OUT.review.csv (--review-below)
    command: str | None = None  # how the user started this run, for the resume hint
    service_tier: str | None = None  # "flex": online requests at batch prices, slower, sometimes refused
    progress_every: float = 1.0
    shard: Shard | None = None  # label only the rows of this shard, into its part of the output (--shard i/N)

    @classmethod
    def build(cls, input: str | Path, output: str | Path, config: TaskConfig, **settings: Any) -> RunOptions:
        """Options from flat settings, with the CLI's defaults: `encoding`, `delimiter`, `require_id_column` go
        to `io`, `checkpoint_rows`/`checkpoint_seconds` to `checkpoint`, `timeout` (None: 60 s, 900 s with
        flex) and `max_retries` to `retry`, `rate_share` (None: 1/N for a shard given --rpm/--tpm, else 1)
        to `limits`; the rest are RunOptions fields."""
        io_names = {f.name for f in fields(IoOptions)} - {"input", "output"}
        where = input if is_uri(input) else Path(input)
        io = IoOptions(where, as_path(output), **{k: settings.pop(k) for k in list(settings) if k in io_names})
        checkpoint = settings.pop("checkpoint", None) or CheckpointOptions(
            rows=settings.pop("checkpoint_rows", None), seconds=settings.pop("checkpoint_seconds", None)
        )
        settings["retry"] = _retry(settings.get("service_tier"), **_pop(settings, "retry", "timeout", "max_retries"))
        settings["limits"] = _limits(settings.get("shard"), **_pop(settings, "limits", "rate_share"))
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(settings) - known):
            raise TypeError(f"unknown run option(s) {unknown}; known: {sorted(known | io_names)}")
        if settings.get("exact_tokens"):
            require_exact_tokens()
        return cls(io=io, config=config, checkpoint=checkpoint, **settings)

    @property
    def input(self) -> Path | str:
        """The input to label (a local path, or a URI)."""
        return self.io.input

    @property
    def output(self) -> Path:
        """The sink."""
        return self.io.output

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The endpoints given (none: $OPENAI_BASE_URL or OpenAI)."""
        if self.base_url is None:
            return ()
        return (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url)

    @property
    def model(self) -> str:
        """The model this run asks for."""
        return self.config.model

    @property
    def resume_command(self) -> str:
        """The command that resumes this run."""
        if self.command:
            return self.command
        return (
            f"labelstream label --input {self.input} --output {self.output} --config {self.config.source} "
            f"--model {self.model}"
        )


def _pop(settings: dict[str, Any], *names: str) -> dict[str, Any]:
    """Take `names` out of `settings`, keeping those given (None: the default)."""
    taken = {name: settings.pop(name, None) for name in names}
    return {name: value for name, value in taken.items() if value is not None}


def _retry(
    tier: str | None, retry: RetryPolicy | None = None, timeout: float | None = None, max_retries: int | None = None
) -> RetryPolicy:
    """The retry policy: as given, else the default with the tier's timeout; `timeout`/`max_retries` override."""
    retry = retry or (RetryPolicy(timeout=FLEX_TIMEOUT) if tier == "flex" else RetryPolicy())
    if timeout is not None:
        retry = replace(retry, timeout=float(timeout))
    return retry if max_retries is None else replace(retry, max_attempts=max_retries + 1)


def _limits(shard: Shard | None, limits: LimitSettings | None = None, rate_share: float | None = None) -> LimitSettings:
    """The limits with this process's share of the key: given, else 1/N for a shard told the key's --rpm/--tpm.

    Shards given --rpm/--tpm were given the key's limit: each takes its part. Without them each shard learns
    the limit from headers, which `--procs` children share (see ratelimit/share.py) and machines may not.
    """
    limits = limits or LimitSettings.automatic()
    if rate_share is None and shard is not None and (limits.rpm or limits.tpm) and limits.share == 1.0:
        rate_share = 1 / shard.count
    return limits if rate_share is None else replace(limits, share=rate_share)


def resolve_endpoints(api_key: str | None, base_urls: Sequence[str]) -> tuple[str, tuple[str | None, ...]]:
    """The API key and the endpoints of a run (one or several); a key is optional only if all are on loopback."""
    if len(base_urls) <= 1:
        key, url = resolve_credentials(api_key, base_urls[0] if base_urls else None)
        return key, (url,)
    remote = [url for url in base_urls if not is_loopback_url(url)]
    key, _ = resolve_credentials(api_key, remote[0] if remote else base_urls[0])
    return key, tuple(base_urls)


def resolve_credentials(api_key: str | None, base_url: str | None) -> tuple[str, str | None]:
    """API key and endpoint from arguments or OPENAI_API_KEY / OPENAI_BASE_URL; a key is optional on loopback."""
    key = api_key or os.environ.get("OPENAI_API_KEY") or None
    url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    if key:
        return key, url
    if is_loopback_url(url):
        return "sk-local-no-key", url
    where = url or "https://api.openai.com/v1"
    raise UsageError(
        f"OPENAI_API_KEY is not set, and {where} needs one. Export OPENAI_API_KEY=..., or point --base-url "
        "at a local server (e.g. labelstream simulate)."
    )


def resume_after(command: str, error: Exception | None) -> str:
    """The command that resumes a run, minus the value that stopped it: after "unknown model" repeating
    `--model X` would fail the same way, so it becomes `--model MODEL` for the user to fill in."""
    cause = getattr(error, "cause", None)
    if cause != "model":
        return command
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--model" and i + 1 < len(words):
            words[i + 1] = "MODEL"
            break
        if word.startswith("--model="):
            words[i] = "--model=MODEL"
            break
    else:
        words += ["--model", "MODEL"]
    return shlex.join(words)
