"""Parts written by processes that hold no lease (Ray Data's write tasks), staged outside the dataset and committed
into it by the run that holds the lease.

    s3://b/p/labels.parquet.meta/staging/<run id>/part-….parquet     written whole by a Ray write task
    s3://b/p/labels.parquet/part-000007-<tag>.parquet                 the same rows, less any already there

A write task can outlive its driver (a killed CLI, a lost node) and PUT its part seconds later, after the next
run read the done ids. Writing it into the dataset would then save those rows twice; in staging it is inert:
readers never look there. Only the lease holder moves rows into the dataset, and only rows whose id it does not
hold yet (`commit_staged`), so a late part is either committed by a later run with its repeated ids filtered out,
or never. A commit publishes first and deletes the staged part after: a crash between the two leaves a part whose
rows the next commit finds in the dataset and drops.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SinkError
from pipeline.input.ids import IdSet
from pipeline.sinks.layout import PART
from pipeline.sinks.parquet import id_entries
from pipeline.sinks.storage import ObjectStore

STAGING: Final = "staging"  # under the sink's `.meta/` prefix


def staged_parts(store: ObjectStore, staging: Path, run_id: str | None = None) -> list[str]:
    """Keys of the parts staged by one run (`run_id`), or by every run, oldest run folder first."""
    runs = [run_id] if run_id else sorted(n for n, _, folder in store.entries(store.key(staging)) if folder)
    keys = []
    for run in runs:
        prefix = store.key(staging / run)
        keys += [f"{prefix}/{name}" for name, _ in sorted(store.objects(prefix)) if PART.match(name)]
    return keys


def commit_staged(
    store: ObjectStore,
    staging: Path,
    done: IdSet,
    publish: Callable[[pa.Table], None],
    run_id: str | None = None,
) -> tuple[int, int]:
    """Publish the rows of staged parts whose ids are not in `done` (adding them to it) and delete the staged parts;
    returns (rows committed, rows dropped as already there). Call it only while holding the sink's lease."""
    committed = dropped = 0
    for key in staged_parts(store, staging, run_id):
        try:
            table = pq.read_table(key, filesystem=store.fs)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(
                f"{store.uri_of(key)} is not a readable Parquet part ({exc}). Delete it and re-run; its rows are "
                "labeled again."
            ) from None
        keep = [done.add(row_id, tag) for row_id, tag in id_entries(table)]
        kept = sum(keep)
        if kept:
            publish(table.filter(pa.array(keep, pa.bool_())))
        store.delete(key)
        committed += kept
        dropped += len(keep) - kept
    return committed, dropped
