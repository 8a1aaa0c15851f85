"""Crash safety with real processes: kill -9 at random moments, then resume; every id ends in the sink exactly once."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

from .helpers import (
    cli,
    kill_at_random_moments,
    label_args,
    progress,
    reviews,
    sink_ids,
    start_cli,
    wait_for,
    write_csv,
)

SINKS = ["out.jsonl", "out.parquet"]


def crash_args(sim: Any, source: Path, output: Path, *extra: str) -> list[str]:
    """`label` with checkpoints every 25 rows or 0.2 s, so a kill finds much saved and much still to do."""
    return label_args(
        sim, source, output, "--concurrency", "16", "--checkpoint-every", "25", "--checkpoint-seconds", "0.2", *extra
    )


def readable(output: Path) -> list[str]:
    """The ids a downstream reader sees right now (Parquet through pyarrow.dataset, like pandas/polars would)."""
    if output.suffix == ".parquet":
        if not output.exists():
            return []
        return ds.dataset(output, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    return sink_ids(output)


@pytest.mark.crash
@pytest.mark.parametrize("name", SINKS)
def test_kill_9_at_random_moments_then_resume_gives_each_id_once(sim: Any, tmp_path: Path, name: str) -> None:
    """SIGKILLs at random moments: the sink stays readable and never repeats an id; the last run completes it."""
    rng = random.Random(f"crash-{name}")
    sim.configure(latency_ms=20)
    rows = reviews(3000)
    wanted = sorted(r[0] for r in rows)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name

    def check() -> None:
        seen = readable(out)
        assert len(seen) == len(set(seen)), "an id was written twice"
        assert set(seen) <= set(wanted), "an id that is not in the input"

    # 8 in flight at 20 ms: at most ~400 rows/s, so the file takes several runs on any machine.
    kills = kill_at_random_moments(
        lambda: start_cli(*crash_args(sim, source, out, "--concurrency", "8")), rng, between=(0.3, 2.0), check=check
    )
    assert kills >= 4, "too few kills landed mid-run to test anything"
    result = cli(*crash_args(sim, source, out))
    assert result.returncode == 0, result.stderr
    assert sorted(readable(out)) == wanted
    if out.suffix == ".parquet":
        assert not list((tmp_path / "out.parquet.meta" / "tmp").glob("*.parquet.tmp"))
        assert all(p.name.endswith(".parquet") for p in out.iterdir())
    else:
        assert out.read_bytes().endswith(b"\n")
    sim.reset()
    again = cli(*crash_args(sim, source, out))
    assert again.returncode == 0
    assert sim.stats()["requests"] == 0


def test_torn_tail_from_a_kill_is_repaired_and_reported(sim: Any, tmp_path: Path) -> None:
    """A half-written last line (what kill -9 during a write leaves) is cut on the next run, which says so."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.jsonl"
    assert cli(*crash_args(sim, source, out, "--limit", "10")).returncode == 0
    with out.open("ab") as handle:
        handle.write(b'{"id":"r00010","label":"posi')
    result = cli(*crash_args(sim, source, out))
    assert result.returncode == 0
    assert "cut a torn last line" in result.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(30))


@pytest.mark.crash
@pytest.mark.parametrize("name", SINKS)
def test_kill_during_a_slow_run_loses_at_most_one_checkpoint(sim: Any, tmp_path: Path, name: str) -> None:
    """What the progress file reports as saved is in the sink after a kill -9: a crash costs at most a checkpoint."""
    sim.configure(latency_ms=20)
    source = write_csv(tmp_path / "in.csv", reviews(3000))
    out = tmp_path / name
    proc = start_cli(*crash_args(sim, source, out))
    wait_for(lambda: progress(out).get("saved", 0) >= 200, what="200 rows saved")
    saved = progress(out)["saved"]
    proc.kill()
    proc.communicate(timeout=30)
    assert len(set(readable(out))) >= saved


@pytest.mark.crash
def test_parquet_sink_is_readable_by_every_reader_mid_run_and_after_kill(sim: Any, tmp_path: Path) -> None:
    """pandas, pyarrow.dataset, polars.scan_parquet(dir) and duckdb's glob read the dataset mid-run and after -9."""
    sim.configure(latency_ms=20)
    source = write_csv(tmp_path / "in.csv", reviews(3000))
    out = tmp_path / "out.parquet"
    proc = start_cli(*crash_args(sim, source, out, "--concurrency", "8"))
    try:
        wait_for(lambda: progress(out).get("saved", 0) >= 100, what="parts published")
        during = read_with_every_reader(out)  # the run is still writing parts and temp files
        proc.kill()
        proc.communicate(timeout=30)
        after = read_with_every_reader(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    # Parts only ever appear, whole: while the run goes each reader sees at least what the one before it saw.
    assert during[0] >= 100 and during == sorted(during)
    assert len(set(after)) == 1 and after[0] >= during[-1]


def read_with_every_reader(out: Path) -> list[int]:
    """Row counts from four readers, read one after another; duckdb also checks that no id repeats."""
    counts = [
        len(pd.read_parquet(out)),
        ds.dataset(out, format="parquet").count_rows(),
        pl.scan_parquet(out).select(pl.len()).collect().item(),
    ]
    with duckdb.connect() as con:
        row = con.execute("select count(*), count(distinct id) from read_parquet(?)", [f"{out}/*.parquet"]).fetchone()
    assert row is not None and row[0] == row[1]
    counts.append(row[0])
    return counts
