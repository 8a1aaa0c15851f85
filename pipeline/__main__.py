"""`python -m pipeline`: the labelstream CLI, interruptible from its first moment.

Ctrl-C and SIGTERM are held back while the CLI's modules load, then let through: one that came meanwhile ends
the run with the usual one line and exit 130. Held back, because a C extension interrupted during its own init
can crash the interpreter (seen with orjson: SIGSEGV), and a traceback from the middle of an import says nothing.
"""

import os
import signal
import sys

_STOP = {signal.SIGINT, signal.SIGTERM}


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _interrupt)
try:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
    try:
        from pipeline.cli import run
        from pipeline.errors import ExitCode
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)  # a signal that came meanwhile is raised now
except KeyboardInterrupt:
    print("labelstream: interrupted; re-run the same command to resume.", file=sys.stderr, flush=True)
    # Signals were held while importing, so the imports above are complete when one is raised here.
    os._exit(ExitCode.INTERRUPTED)  # as cli.run does: CPython may re-raise a caught SIGINT on the way out

run()
