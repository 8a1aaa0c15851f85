"""Errors a user can cause, each with a message that says what to do next.

Exit codes are the members of `ExitCode`; every way out of the CLI, and `--procs` ranking its children, uses them.

    LabelstreamError                 base; the CLI prints .message and exits with .exit_code
    ├── UsageError          (2)      flags that contradict each other or name nothing
    ├── ConfigError         (2)      a task file that is missing, unreadable or invalid
    ├── InputError          (2)      a CSV that cannot be read: missing column, encoding, empty file
    ├── SinkError           (2)      an output that cannot be resumed as it is
    │   └── SinkMismatchError (2)    resuming a sink made with another model, prompt or label set
    ├── FatalApiError       (2)      auth, permission, unknown model, no quota: every row would fail
    ├── BatchError          (2)      the Batch API refused or failed a batch, or the endpoint has none
    ├── StorageError        (3)      the sink cannot be written (disk full, permissions); work so far is kept
    └── OverBudget          (4)      --max-cost: the estimate is over it (nothing sent), or the run stopped
                                     before passing it (finished rows saved; resumable)

A row that fails is not an exception here: it ends as a dead letter and the run carries on.
Anything else that escapes is a bug and shows its traceback (with the API key redacted).
"""

from __future__ import annotations

import re
from enum import IntEnum


class ExitCode(IntEnum):
    """What a labelstream process exits with (documented in the README; scripts branch on these)."""

    OK = 0  # every row labeled (or, with --no-wait, sent)
    DEAD_LETTERS = 1  # finished, but some rows are dead letters (or came back unprocessed): re-run to retry them
    USAGE = 2  # flags, task file, input, sink or a fatal API answer: nothing more can be done as it is
    STORAGE = 3  # the sink cannot be written; work so far is kept
    BUDGET = 4  # --max-cost: refused before any request, or stopped before passing it (saved, resumable)
    BUG = 70  # an exception that is not a LabelstreamError (EX_SOFTWARE)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM, after saving (128 + SIGINT, as shells report it)


class LabelstreamError(Exception):
    """Base of every error a user can cause; `message` tells them what to do next."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(LabelstreamError):
    """Flags that contradict each other or point at nothing."""


class ConfigError(LabelstreamError):
    """A task file that is missing, unreadable or invalid."""


class InputError(LabelstreamError):
    """An input CSV that cannot be read as asked."""


class SinkError(LabelstreamError):
    """An output that cannot be resumed as it is."""


class SinkMismatchError(SinkError):
    """The sink was labeled with a different model, prompt or label set."""


class FatalApiError(LabelstreamError):
    """The API refuses every request (bad key, no permission, unknown model, no quota)."""

    def __init__(self, message: str, *, status: int | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.cause = cause  # "key", "model", "quota" or None: what to fix before resuming


class BatchError(LabelstreamError):
    """The Batch API refused or failed a batch (bad request file, no Batch API at this endpoint, ...)."""


class StorageError(LabelstreamError):
    """The sink or its side files cannot be written; what was written before stays readable."""

    exit_code = ExitCode.STORAGE


class OverBudget(LabelstreamError):  # noqa: N818 - it names what happened, like Interrupted
    """--max-cost: the run would cost more (refused before any request) or stopped before passing it."""

    exit_code = ExitCode.BUDGET


class Interrupted(LabelstreamError):  # noqa: N818 - it names what happened, like KeyboardInterrupt
    """The run was stopped by a signal after flushing the sink."""

    exit_code = ExitCode.INTERRUPTED


_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_*.\-]{6,}")


def redact(text: str, secret: str | None = None) -> str:
    """Return `text` without `secret` and without anything shaped like an OpenAI key.

    Providers echo keys back in masked form ("sk-proj-****abcd"); the visible edges alone
    identify a key, so any `sk-…` token goes, not only the exact secret.
    """
    if secret:
        text = text.replace(secret, "[redacted]")
        if len(secret) >= 16:  # a masked echo keeps the key's start
            text = text.replace(secret[:8], "[redacted]")
    return _KEY_LIKE.sub("sk-[redacted]", text)


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with "…" when something was cut.

    A message cut mid-word ("…please check your pl") reads like a bug; the last whole words read like a summary.
    """
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:  # a text without spaces (a URL, a token) is cut where it must be
        cut = cut[:space]
    return cut.rstrip(" ,;:-(") + "…"
