"""labelstream: label large CSV files with an OpenAI-compatible chat model, streaming and resumable.

from pipeline import label_csv, LimitSettings
summary = label_csv("reviews.csv", "labels.parquet", "configs/sentiment.toml",
                    limits=LimitSettings(concurrency=50))
"""

from pipeline.client import RetryPolicy
from pipeline.config import TaskConfig, load_config
from pipeline.errors import (
    ConfigError,
    FatalApiError,
    InputError,
    Interrupted,
    LabelstreamError,
    SinkError,
    SinkMismatchError,
    StorageError,
    UsageError,
)
from pipeline.limits import LimitSettings
from pipeline.options import RunOptions
from pipeline.run import label_csv, run_label
from pipeline.source import Row
from pipeline.summary import Summary

__all__ = [
    "ConfigError",
    "FatalApiError",
    "InputError",
    "Interrupted",
    "LabelstreamError",
    "LimitSettings",
    "RetryPolicy",
    "Row",
    "RunOptions",
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
