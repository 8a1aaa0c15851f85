"""The subcommands, one module each: `register(sub)` adds a parser whose `handler(args, argv)` runs it.

A new command is a module here with a `register` function, listed in `COMMANDS`. Command modules import
heavy libraries inside their handlers, so `--help` stays fast.
"""

from __future__ import annotations

from pipeline.commands import batch, compare, eval, label, labelstudio, simulate, sinks

COMMANDS = (label, batch, simulate, sinks, eval, compare, labelstudio)
