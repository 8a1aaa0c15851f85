"""duckdb, pandas and polars read a labelstream dataset from the bucket while a run writes it (s3:// and gs://)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

from .gcs import gcs_bucket as gcs_bucket  # noqa: PLC0414 - the fixtures, re-exported by the names tests ask for
from .gcs import gcs_server as gcs_server  # noqa: PLC0414
from .helpers import reviews, start_cli, wait_for, write_csv
from .s3 import both_stores
from .s3 import bucket as bucket  # noqa: PLC0414
from .s3 import s3_server as s3_server  # noqa: PLC0414
from .test_storage import label_args


@pytest.mark.crash
@both_stores
def test_duckdb_pandas_and_polars_read_the_bucket_mid_run(sim: Any, tmp_path: Path, bucket: Any) -> None:
    """While a run writes the dataset into a bucket, duckdb (over a pyarrow dataset on the bucket's filesystem, since
    its httpfs extension cannot be downloaded offline), pandas and polars read whole parts: no id twice."""
    target = bucket
    sim.configure(latency_ms=20)
    source = write_csv(tmp_path / "in.csv", reviews(1500))
    proc = start_cli(*label_args(sim, source, target.uri("mid/out.parquet"), "--concurrency", "8"), env=target.env)
    try:
        wait_for(lambda: len(target.ids("mid/out.parquet")) >= 100, what="parts in the bucket")
        # The snippet of docs/object-storage.md: one pyarrow dataset on the bucket, handed to each library.
        labels = ds.dataset(f"{target.name}/mid/out.parquet", filesystem=target.fs, format="parquet")
        by_duckdb = [row[0] for row in duckdb.sql("select id from labels").fetchall()]
        counted = duckdb.sql("select label, count(*) from labels group by label").fetchall()
        by_pandas = list(pd.read_parquet(f"{target.name}/mid/out.parquet", filesystem=target.fs)["id"])
        by_polars = pl.scan_pyarrow_dataset(labels).select("id").collect()["id"].to_list()
        assert proc.poll() is None, "the run ended before the readers read it mid-run"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    for ids in (by_duckdb, by_pandas, by_polars):
        assert len(ids) >= 100 and len(ids) == len(set(ids))
    assert sum(n for _, n in counted) == len(by_duckdb)
