"""labelstream as a stage of a Ray Data pipeline (`pip install 'labelstream[ray]'`: plain `ray[data]`).

    import ray
    from pipeline.ray import label_dataset, write_labels

    ds = ray.data.read_parquet("s3://bucket/reviews/")
    labeled = label_dataset(ds, "configs/sentiment.toml", model="gpt-4o-mini", rpm=10_000, actors=4,
                            skip_done="s3://bucket/labels.parquet")
    write_labels(labeled, "s3://bucket/labels.parquet")

Each actor runs labelstream's async client with many requests in flight (same prompt, reply validation,
retries and 429 handling as the CLI); one small `SharedLimit` actor holds the job's RPM/TPM schedule and
its 429 pauses. `write_labels` uses Ray Data's Parquet writer with labelstream's part names (and, for a
local directory, atomic files), so `labelstream status/export/eval/compact` read the result. Re-running
the same two lines after a crash labels only the rows no written part holds (`skip_done`).

The API key comes from OPENAI_API_KEY in the workers' environment (a local `ray.init()` passes the
driver's on; on a cluster, set it in the cluster's environment). It is never a task argument.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engines.ray.labeler import Labeler, rows_table
from pipeline.engines.ray.limit import SharedLimit
from pipeline.engines.ray.output import done_ids, is_remote, local_path, write_args
from pipeline.errors import UsageError
from pipeline.ratelimit.limiter import AUTO_CEILING, LimitSettings, RetryPolicy
from pipeline.results import new_run_id, now_iso
from pipeline.sinks.meta import Identity, SinkMeta
from pipeline.sinks.parquet import record_schema
from pipeline.task.config import TaskConfig, load_config

if TYPE_CHECKING:
    import ray.data

__all__ = ["label_dataset", "write_labels"]

ACTOR_CPUS: Final = 0.25  # an actor waits on the network; a quarter CPU leaves room for reads and writes
AUTO_BATCH: Final = 256  # rows per batch under --concurrency auto
ROWS_AT_ONCE: Final = 1000  # rows per block when preparing a user's dataset
ROWS_PER_FILE: Final = 1000  # labeled rows per written part: what a crash may re-pay, against many small files


@dataclass(frozen=True, slots=True)
class _Job:
    """What made a labeled dataset: `write_labels` records it in the sink's manifest."""

    task: TaskConfig
    model: str
    id_column: str | None


_JOBS: weakref.WeakKeyDictionary[Any, _Job] = weakref.WeakKeyDictionary()


def label_dataset(
    ds: ray.data.Dataset,
    config: TaskConfig | str | Path,
    *,
    model: str | None = None,
    base_url: str | None = None,
    concurrency: int | None = 64,
    rpm: float | None = None,
    tpm: float | None = None,
    actors: int = 2,
    batch_size: int | None = None,
    retry: RetryPolicy | None = None,
    skip_done: str | Path | None = None,
    dead_letters: str | Path | None = None,
    service_tier: str | None = None,
) -> ray.data.Dataset:
    """Label `ds` (its id, text and carry columns as the task config names them); return sink records.

    `concurrency` is the job's requests in flight, split over `actors` (None: auto, each actor finds its own
    window under the shared limit). `rpm`/`tpm` are the key's limits, shared by all actors (also learned
    from `x-ratelimit-*` headers). Rows whose id is in a complete part of `skip_done` are not sent, and an id
    repeated in `ds` is labeled once (its first row to reach an actor). Failed
    rows are left out of the result and, with `dead_letters` (a local or shared file path), appended there
    as labelstream dead letters; a later run sends them again.
    """
    task = config if isinstance(config, TaskConfig) else load_config(Path(config))
    carry = tuple(task.carry)
    missing = [c for c in (*task.template_columns, *carry) if c not in ds.columns()]
    if missing:
        raise UsageError(f"the dataset has no column {', '.join(map(repr, missing))}; it has {ds.columns()}.")
    rows = ds.map_batches(
        rows_table,  # type: ignore[arg-type]  # ray's protocol does not admit keyword arguments
        fn_kwargs={"config": task, "carry": carry},
        batch_format="pyarrow",
        batch_size=ROWS_AT_ONCE,
        num_cpus=ACTOR_CPUS,
    )
    outputs = [(f.name, f.kind) for f in task.outputs]
    schema = record_schema(carry, multi_label=task.multi_label, outputs=outputs)
    if skip_done is not None:
        rows = skip_ids(rows, done_ids(str(skip_done)))
    labeled, _ = label_rows(
        rows,
        task,
        schema=schema,
        model=model or task.model,
        base_url=base_url,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        actors=actors,
        batch_size=batch_size,
        retry=retry or RetryPolicy(),
        dead_letters=str(dead_letters) if dead_letters else None,
        service_tier=service_tier,
    )
    has_ids = task.id_column is not None and task.id_column in ds.columns()
    _JOBS[labeled] = _Job(task, model or task.model, task.id_column if has_ids else None)
    return labeled


def write_labels(ds: ray.data.Dataset, path: str | Path, *, rows_per_file: int = ROWS_PER_FILE) -> None:
    """Write `label_dataset`'s records to `path` as a labelstream Parquet sink (runs the job). Labeled rows
    are written once `rows_per_file` of them are ready, so that is about what a crash can make you pay again."""
    where = str(path)
    if not is_remote(where) and not local_path(where).name.endswith(".parquet"):
        raise UsageError(f"{where}: name the output directory *.parquet (a labelstream Parquet sink).")
    job = _JOBS.get(ds)
    if job is not None and not is_remote(where):
        _write_manifest(local_path(where), job)
    ds.write_parquet(where, **write_args(where, rows_per_file=rows_per_file))


def _write_manifest(path: Path, job: _Job) -> None:
    """The sink's manifest, so that `status` and `eval` know the model, prompt and labels, and so that a run
    with another model or prompt never mixes its labels into these (the resume guard of the CLI)."""
    task = job.task
    identity = Identity(
        model=job.model,
        prompt=task.prompt_fingerprint(),
        labels=task.labels,
        multi_label=task.multi_label,
        id_source=f"column:{job.id_column}" if job.id_column else "content-hash",
    )
    meta = SinkMeta(path)
    has_rows = path.is_dir() and any(path.iterdir())
    manifest = meta.check_identity(identity, has_rows=has_rows, force=False, sink_name=str(path))
    manifest.input = {
        "id_column": job.id_column,
        "text_column": task.text_column,
        "template": task.template,
        "config": str(Path(task.source).resolve()) if Path(task.source).is_file() else None,
    }
    manifest.runs.append({"started_at": now_iso(), "model": job.model, "engine": "ray"})
    meta.ensure()
    meta.write_manifest(manifest)


def skip_ids(rows: ray.data.Dataset, done: pa.Array) -> ray.data.Dataset:
    """`rows` without the ids in `done` (labelstream's done-id filter, applied before any actor sees them)."""
    if not len(done):
        return rows
    import ray  # noqa: PLC0415 - the caller has Ray

    held = ray.put(done)
    return rows.map_batches(
        _without,  # type: ignore[arg-type]  # ray's protocol does not admit keyword arguments
        fn_kwargs={"done": [held]},
        batch_format="pyarrow",
        num_cpus=ACTOR_CPUS,
    )


def _without(batch: pa.Table, done: list[Any]) -> pa.Table:
    import ray  # noqa: PLC0415

    ids: pa.Array = ray.get(done[0])
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ids)))


def label_rows(
    rows: ray.data.Dataset,
    task: TaskConfig,
    *,
    schema: pa.Schema,
    model: str,
    base_url: str | None,
    concurrency: int | None,
    rpm: float | None,
    tpm: float | None,
    actors: int,
    batch_size: int | None,
    retry: RetryPolicy,
    dead_letters: str | None,
    service_tier: str | None,
    run_id: str | None = None,
    remembered: Mapping[str, float] | None = None,
    storage: dict[str, str] | None = None,
) -> tuple[ray.data.Dataset, Any]:
    """The labeling stage over rows already in the Labeler's columns; returns it and the `SharedLimit` actor.
    `storage`: the non-secret options of the object store `dead_letters` is on."""
    import ray  # noqa: PLC0415

    if actors < 1:
        raise UsageError(f"actors must be at least 1 (got {actors}).")
    # Each actor's own limiter keeps only its window: the rates are the SharedLimit's alone, so an actor
    # whose siblings have run out of rows may use the whole limit.
    if concurrency is None:
        limits = LimitSettings(concurrency=AUTO_CEILING // actors, auto=True)
    else:
        limits = LimitSettings(concurrency=max(1, math.ceil(concurrency / actors)))
    # Ray Data runs a few batches of an async actor at once: batches of half the window keep it full.
    size = batch_size or (AUTO_BATCH if concurrency is None else max(16, math.ceil(limits.concurrency / 2)))
    shared = ray.remote(num_cpus=0)(SharedLimit).remote(rpm, tpm, remembered=remembered)
    labeled = rows.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "config": task,
            "model": model,
            "base_url": base_url,
            "limits": limits,
            "retry": retry,
            "shared": shared,
            "schema": schema,
            "dead_letters": dead_letters,
            "run_id": run_id or new_run_id(),
            "service_tier": service_tier,
            "storage": storage,
        },
        batch_size=size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ACTOR_CPUS,
    )
    return labeled, shared
