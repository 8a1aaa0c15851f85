"""What a labeling run needs, resolved from flags or keyword arguments: `RunOptions` and its helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pipeline.client import RetryPolicy
from pipeline.config import TaskConfig
from pipeline.errors import UsageError
from pipeline.limits import LimitSettings
from pipeline.meta import Identity
from pipeline.source import CsvSource

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything a run needs; the CLI builds it from flags, `label_csv` from keyword arguments."""

    input: Path
    output: Path
    config: TaskConfig
    limits: LimitSettings = field(default_factory=LimitSettings.automatic)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    api_key: str | None = None
    base_url: str | None = None
    limit: int | None = None
    force: bool = False
    restart: bool = False
    progress: bool = True
    checkpoint_rows: int | None = None
    checkpoint_seconds: float | None = None
    grace_seconds: float = 10.0
    encoding: str = "utf-8"
    delimiter: str | None = None
    require_id_column: bool = False  # the id column was named explicitly: its absence is an error, not a fallback
    command: str | None = None  # how the user started this run, for the resume hint
    progress_every: float = 1.0
    exact_tokens: bool = False  # count prompt tokens with bpe-openai under a TPM limit (extra: labelstream[tokens])

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


def resolve_credentials(api_key: str | None, base_url: str | None) -> tuple[str, str | None]:
    """API key and endpoint from arguments or OPENAI_API_KEY / OPENAI_BASE_URL; a key is optional on loopback."""
    key = api_key or os.environ.get("OPENAI_API_KEY") or None
    url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    if key:
        return key, url
    host = urlparse(url).hostname if url else None
    if host in LOCAL_HOSTS:
        return "sk-local-no-key", url
    where = url or "https://api.openai.com/v1"
    raise UsageError(
        f"OPENAI_API_KEY is not set, and {where} needs one. Export OPENAI_API_KEY=..., or point --base-url "
        "at a local server (e.g. labelstream simulate)."
    )


def open_source(opts: RunOptions) -> CsvSource:
    """The run's CSV reader (not yet opened)."""
    return CsvSource(
        opts.input,
        opts.config,
        encoding=opts.encoding,
        delimiter=opts.delimiter,
        require_id_column=opts.require_id_column,
    )


def identity_of(opts: RunOptions, source: CsvSource) -> Identity:
    """What the resume guard compares: model, prompt fingerprint, labels, and how ids are made."""
    return Identity(
        model=opts.model,
        prompt=opts.config.prompt_fingerprint(),
        labels=opts.config.labels,
        multi_label=opts.config.multi_label,
        id_source=source.id_source,
    )
