"""labelstream: label large CSV files with an OpenAI-compatible chat model, streaming and resumable.

from pipeline import label_csv, LimitSettings
summary = label_csv("reviews.csv", "labels.parquet", "configs/sentiment.toml",
                    limits=LimitSettings(concurrency=50))

The names below load on first use, so `import pipeline` (and the CLI's `--help`) does not pay for the
SDK, aiohttp or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.engines import label_csv, run_label
    from pipeline.errors import (
        BatchError,
        ConfigError,
        ExitCode,
        FatalApiError,
        InputError,
        Interrupted,
        LabelstreamError,
        OverBudget,
        SinkError,
        SinkMismatchError,
        StorageError,
        UsageError,
    )
    from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
    from pipeline.results import Row
    from pipeline.run.options import RunOptions
    from pipeline.run.summary import Summary
    from pipeline.sinks.progress_file import RunState
    from pipeline.task.config import TaskConfig, load_config

_WHERE = {
    "BatchError": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "ExitCode": "pipeline.errors",
    "FatalApiError": "pipeline.errors",
    "InputError": "pipeline.errors",
    "Interrupted": "pipeline.errors",
    "LabelstreamError": "pipeline.errors",
    "OverBudget": "pipeline.errors",
    "SinkError": "pipeline.errors",
    "SinkMismatchError": "pipeline.errors",
    "StorageError": "pipeline.errors",
    "UsageError": "pipeline.errors",
    "LimitSettings": "pipeline.ratelimit.limiter",
    "RetryPolicy": "pipeline.ratelimit.limiter",
    "Row": "pipeline.results",
    "RunOptions": "pipeline.run.options",
    "RunState": "pipeline.sinks.progress_file",
    "Summary": "pipeline.run.summary",
    "TaskConfig": "pipeline.task.config",
    "load_config": "pipeline.task.config",
    "label_csv": "pipeline.engines",
    "run_label": "pipeline.engines",
}
__all__ = [
    "BatchError",
    "ConfigError",
    "ExitCode",
    "FatalApiError",
    "InputError",
    "Interrupted",
    "LabelstreamError",
    "LimitSettings",
    "OverBudget",
    "RetryPolicy",
    "Row",
    "RunOptions",
    "RunState",
    "SinkError",
    "SinkMismatchError",
    "StorageError",
    "Summary",
    "TaskConfig",
    "UsageError",
    "label_csv",
    "load_config",
    "run_label",
]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
