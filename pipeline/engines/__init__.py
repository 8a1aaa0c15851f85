"""Engines: how a run's requests travel. The run around them (`pipeline.run.lifecycle.Run`) is one for all.

    online   requests as the rows come (`online`)
    batch    request files through the OpenAI Batch API (`batch/engine`)
    auto     a first slice online, the rest as batches (`batch/auto`)
    ray      a Ray Data job, one shared rate limit for its actors (`ray/engine`)

A new engine is one module with a class that follows `pipeline.run.lifecycle.Engine` and an
`async def run(opts, *, notice=None, **settings) -> Summary` (usually `Run(opts, TheEngine(...)).execute()`),
plus one line in `ENGINES`. Modules load only when their engine runs, so `import pipeline.cli` stays light.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pipeline.run.options import RunOptions
    from pipeline.run.summary import Summary
    from pipeline.task.config import TaskConfig

# --engine name → the module whose `run` carries it out; the first is the default.
ENGINES: Final = {
    "online": "pipeline.engines.online",
    "batch": "pipeline.engines.batch.engine",
    "auto": "pipeline.engines.batch.auto",
    "ray": "pipeline.engines.ray.engine",
}


async def run_engine(name: str, opts: RunOptions, *, notice: IO[str] | None = None, **settings: Any) -> Summary:
    """Run `opts` with the engine `name`; `settings` are engine settings (`batch=BatchSettings(...)`,
    `actors=4`), each engine taking the ones it knows."""
    module = ENGINES.get(name)
    if module is None:
        raise ValueError(f"no engine {name!r}; there are {', '.join(ENGINES)}")
    summary: Summary = await importlib.import_module(module).run(opts, notice=notice, **settings)
    return summary


async def run_label(opts: RunOptions, *, notice: IO[str] | None = None) -> Summary:
    """Run one labeling job with the online engine to the end (or to a signal) and return its summary."""
    return await run_engine("online", opts, notice=notice)


def label_csv(input: str | Path, output: str | Path, config: TaskConfig | str | Path, **options: Any) -> Summary:
    """Label a CSV file into a JSONL or Parquet sink, resuming what the sink already holds.

    `config` is a TaskConfig or the path of a task file; `options` are RunOptions fields or the flat names
    `RunOptions.build` sorts into groups (e.g. `limits=LimitSettings(concurrency=50)`, `base_url=...`,
    `max_rows=1000`, `encoding="cp949"`, `checkpoint_rows=500`).
    """
    from pipeline.run.options import RunOptions  # noqa: PLC0415 - the registry itself stays light
    from pipeline.task.config import TaskConfig, load_config  # noqa: PLC0415

    task = config if isinstance(config, TaskConfig) else load_config(config)
    return asyncio.run(run_label(RunOptions.build(input, output, task, **options)))
