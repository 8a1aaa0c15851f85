"""Argument types shared by the commands: finite, bounded numbers, the seed flags' booleans, locations."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_bool(text: str) -> bool:
    """True/False, as the old script's --skip_labeled took it (also 1/0, yes/no)."""
    value = text.strip().lower()
    if value in {"true", "1", "yes", "y"}:
        return True
    if value in {"false", "0", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def number(
    kind: type[int] | type[float], *, above: float | None = None, at_least: float | None = None
) -> Callable[[str], Any]:
    """An argparse type for a finite number with a lower bound (`above` is exclusive, `at_least` inclusive)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"expected a number > {above:g}, got {text}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"expected a number ≥ {at_least:g}, got {text}")
        return value

    return parse


positive_int = number(int, at_least=1)
count = number(int, at_least=0)
positive_float = number(float, above=0)
seconds = number(float, at_least=0)


def share(text: str) -> float:
    """A share from 0 to 1 (a rate of simulated faults)."""
    value = number(float, at_least=0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text}")
    return float(value)


def concurrency(text: str) -> int | str:
    """A positive number of requests in flight, or 'auto'."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def fraction(text: str) -> float:
    """A share above 0 and at most 1, as `1/4` or `0.25` (a process's share of a rate limit)."""
    num, sep, den = text.partition("/")
    try:
        value = float(num) / float(den) if sep else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a share such as 1/4 or 0.25, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a share above 0 and at most 1, got {text}")
    return value


def location(text: str) -> Path:
    """An output given on the command line: a local path, or an s3:// or gs:// URI kept as written."""
    from pipeline.sinks.storage import as_path  # noqa: PLC0415 - only when a command is parsed

    return as_path(text)


def add_storage_option(parser: Any) -> None:
    """`--storage-option KEY=VALUE` for a command that reads or writes an s3:// or gs:// location (applied for the
    whole process by `cli.main`, before the command runs)."""
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="for an s3:// or gs:// input or output: endpoint_override, region, profile, lease_seconds, "
        "access_key, secret_key, session_token (s3), access_token (gs) (repeatable; credentials are safer in AWS_*, a "
        "profile or GOOGLE_APPLICATION_CREDENTIALS, and are never written anywhere)",
    )
