"""`labelstream label-studio-config CONFIG`: the Label Studio labeling config that matches a task file."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ExitCode


def register(sub: Any) -> None:
    """Add the `label-studio-config` subcommand."""
    cfg = sub.add_parser(
        "label-studio-config",
        help="print the Label Studio labeling config (XML) for a task file, to review exported tasks",
    )
    cfg.add_argument("config", type=Path, help="the task file (e.g. configs/sentiment.toml)")
    cfg.set_defaults(handler=run)


def run(args: argparse.Namespace, _argv: Sequence[str]) -> int:
    """Print the XML."""
    from pipeline.analysis.labelstudio import labeling_config  # noqa: PLC0415 - commands load what they need
    from pipeline.task.config import load_config  # noqa: PLC0415

    print(labeling_config(load_config(args.config)))
    return ExitCode.OK
