"""`--storage-option key=value`: which options exist, which are secrets, and the ones this process was given.

The values of secret options are handed to the stores' clients and nowhere else: never echoed in an error,
written to a progress file or passed to other processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from pipeline.errors import UsageError

# Storage options a user may pass; anything else is a typo that would otherwise be ignored silently.
OPTION_NAMES: Final = frozenset(
    {"endpoint_override", "region", "access_key", "secret_key", "session_token", "profile", "lease_seconds"}
    | {"access_token"}  # gs:// only: an OAuth token (e.g. `gcloud auth print-access-token`)
)
_SECRET_OPTIONS: Final = frozenset({"access_key", "secret_key", "session_token", "access_token"})

# Set once per process by the CLI (`--storage-option`), like the AWS_* environment it complements.
_configured: dict[str, str] = {}


def configure(options: Mapping[str, str]) -> None:
    """Use these storage options for every object store this process opens (from `--storage-option`)."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise UsageError(f"--storage-option {unknown[0]}: unknown; use one of {', '.join(sorted(OPTION_NAMES))}.")
    _configured.clear()
    _configured.update(options)


def shareable_options() -> dict[str, str]:
    """The `--storage-option`s that are not credentials: what may be handed to other processes (Ray's workers)."""
    return {key: value for key, value in _configured.items() if key not in _SECRET_OPTIONS}


def secret_options() -> list[str]:
    """The names of the credentials given as `--storage-option` (never their values)."""
    return sorted(set(_configured) & _SECRET_OPTIONS)


def parse_option(text: str) -> tuple[str, str]:
    """`key=value` from the command line (the value is never echoed: it may be a secret)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--storage-option {key.strip() or text[:20]!r}: write it as key=value.")
    return key.strip(), value


def redact_argv(words: Sequence[str]) -> list[str]:
    """A command line fit to show or write: the values of secret `--storage-option`s replaced by `***`."""
    out: list[str] = []
    follows = False
    for word in words:
        if word.startswith("--storage-option="):
            out.append(f"--storage-option={_redact_option(word.partition('=')[2])}")
        else:
            out.append(_redact_option(word) if follows else word)
        follows = word == "--storage-option"
    return out


def _redact_option(text: str) -> str:
    key, eq, _ = text.partition("=")
    return f"{key}=***" if eq and key.strip() in _SECRET_OPTIONS else text


def configured() -> Mapping[str, str]:
    """The options `configure` set for this process (empty when none were given)."""
    return _configured
