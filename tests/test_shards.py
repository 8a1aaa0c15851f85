"""Shards: `--shard i/N` labels disjoint parts of the input into one output, and every reader sees it as one."""

from __future__ import annotations

import collections
import random
import signal
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.analysis.status import sink_status
from pipeline.errors import SinkError, SinkMismatchError, UsageError
from pipeline.input.ids import IdSet
from pipeline.input.shards import Shard, key_shard, parse_shard, shard_of
from pipeline.results import text_sha
from pipeline.sinks import open_shards, open_sink
from pipeline.sinks.layout import MERGING, part_shard
from pipeline.sinks.parquet import ParquetSink

from .helpers import SENTIMENT, cli, label, label_args, reviews, start_cli, wait_for, write_csv

SINKS = ["out.jsonl", "out.parquet"]


def all_ids(output: Path) -> list[str]:
    """Every id of every shard of an output (repeats kept)."""
    return [r["id"] for sink in open_shards(output) for r in sink.iter_records(columns=["id"])]


def shard_args(sim: Any, source: Path, output: Path, shard: str, *extra: str) -> list[str]:
    return label_args(sim, source, output, "--shard", shard, *extra)


def test_the_shard_of_an_id_is_fixed_and_the_shards_are_even() -> None:
    """The shard depends on the id alone (pinned values), and 20k ids fall about evenly into 4 shards."""
    assert (shard_of("r00000", 4), shard_of("r00001", 4), shard_of("한국어 id", 4)) == (2, 3, 0)
    counts = collections.Counter(shard_of(f"row-{i}", 4) for i in range(20_000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(4500 < n < 5500 for n in counts.values()), counts


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("2/8", {}, Shard(2, 8)),
        (" 0 / 1 ", {}, Shard(0, 1)),
        ("auto", {"JOB_COMPLETION_INDEX": "3", "LABELSTREAM_SHARDS": "4"}, Shard(3, 4)),
        ("auto/6", {"JOB_COMPLETION_INDEX": "5"}, Shard(5, 6)),
        ("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "8"}, Shard(7, 8)),
        ("AUTO", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "LABELSTREAM_SHARDS": "8"}, Shard(3, 8)),
    ],
)
def test_shard_flags_and_scheduler_variables(text: str, env: dict[str, str], expected: Shard) -> None:
    """--shard i/N, and --shard auto from a Kubernetes Indexed Job or a Slurm array (also a re-run of one task)."""
    assert parse_shard(text, env) == expected


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("4/4", {}, "counts from 0"),
        ("1-4", {}, "use i/N"),
        ("auto", {}, "neither is set"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, "LABELSTREAM_SHARDS"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "x"}, "not a whole number"),
    ],
)
def test_bad_shard_flags_say_what_to_do(text: str, env: dict[str, str], message: str) -> None:
    """A wrong --shard is a usage error that names the fix."""
    with pytest.raises(UsageError, match=message):
        parse_shard(text, env)


@pytest.mark.parametrize("name", SINKS)
def test_shards_label_disjoint_parts_into_one_output(sim: Any, tmp_path: Path, name: str) -> None:
    """Three shards together label every row once; each writes only its own rows, in files named for it."""
    rows = reviews(300)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    sent = 0
    for k in range(3):
        summary = label(sim, source, out, shard=Shard(k, 3), dedupe=False)  # by id (with dedupe: by text)
        assert summary.exit_code == 0 and summary.other_shards == 300 - summary.labeled
        sent += summary.labeled
    assert sim.stats()["requests"] == sent == 300
    ids = all_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows)
    for k in range(3):
        sink = open_sink(out, Shard(k, 3))
        assert {r["id"] for r in sink.iter_records(columns=["id"])} == {r[0] for r in rows if shard_of(r[0], 3) == k}
        assert (tmp_path / f"{name}.meta" / f"shard-{k}-of-3" / "manifest.json").exists()
    if name.endswith(".jsonl"):
        assert sorted(p.name for p in tmp_path.glob("out.shard-*.jsonl")) == [
            f"out.shard-{k}-of-3.jsonl" for k in range(3)
        ]
        assert not out.exists()
    else:
        names = [p.name for p in out.iterdir()]
        assert {part_shard(n) for n in names} == {Shard(0, 3), Shard(1, 3), Shard(2, 3)}
        assert all(n.startswith("part-s0") and "of03-" in n for n in names)
        assert len(pl.scan_parquet(out).collect()) == 300 == len(pd.read_parquet(out))
        assert ds.dataset(out, format="parquet").count_rows() == 300
        with duckdb.connect() as con:
            row = con.execute("select count(distinct id) from read_parquet(?)", [f"{out}/*.parquet"]).fetchone()
        assert row == (300,)


@pytest.mark.parametrize("name", SINKS)
def test_sharding_is_stable_when_rows_are_appended_and_reordered(sim: Any, tmp_path: Path, name: str) -> None:
    """After rows are appended and the file is shuffled, a shard resumes and labels only its new rows."""
    first = reviews(200)
    out = tmp_path / name
    label(sim, write_csv(tmp_path / "a.csv", first), out, shard=Shard(1, 2), dedupe=False)  # by id
    before = set(all_ids(out))
    assert before == {r[0] for r in first if shard_of(r[0], 2) == 1}
    grown = first + reviews(100, prefix="new")
    random.Random(7).shuffle(grown)
    sim.reset()
    # The new rows repeat old texts: without dedupe=False they would be copied from the sink, not sent.
    summary = label(sim, write_csv(tmp_path / "b.csv", grown), out, shard=Shard(1, 2), dedupe=False)
    new_mine = {r[0] for r in grown if r[0].startswith("new") and shard_of(r[0], 2) == 1}
    assert sim.stats()["requests"] == len(new_mine) == summary.labeled
    assert summary.skipped_done == len(before)
    assert sorted(all_ids(out)) == sorted(before | new_mine)


@pytest.mark.parametrize("name", SINKS)
def test_an_output_keeps_one_layout(sim: Any, tmp_path: Path, name: str) -> None:
    """A shard of another N, an unsharded run (or restart) on a sharded output, and a shard on an unsharded one are
    refused, and leave nothing behind."""
    source = write_csv(tmp_path / "in.csv", reviews(40))
    sharded, plain = tmp_path / name, tmp_path / f"plain{Path(name).suffix}"
    label(sim, source, sharded, shard=Shard(0, 2))
    with pytest.raises(SinkMismatchError, match=r"written by 2 shards; this run is shard 0/3.*--shard i/2"):
        label(sim, source, sharded, shard=Shard(0, 3))
    with pytest.raises(SinkMismatchError, match=r"split into 2 shards; run them with --shard i/2"):
        label(sim, source, sharded)
    with pytest.raises(SinkMismatchError, match="split into 2 shards"):  # not moved aside from under its shards
        label(sim, source, sharded, restart=True)
    assert not list(tmp_path.glob("*.bak-*"))
    label(sim, source, plain)
    with pytest.raises(SinkMismatchError, match="without --shard"):
        label(sim, source, plain, shard=Shard(1, 2))
    assert label(sim, source, sharded, shard=Shard(1, 2)).exit_code == 0
    assert sorted(all_ids(sharded)) == sorted(all_ids(plain))


def test_a_new_shard_takes_the_setup_its_siblings_labeled_with(sim: Any, tmp_path: Path) -> None:
    """A shard that has labeled nothing yet is refused another model than its siblings used, unless --force."""
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.parquet"
    label(sim, source, out, shard=Shard(0, 2))
    other = SENTIMENT.with_overrides(model="gpt-4.1-mini")
    with pytest.raises(SinkMismatchError, match=r"shard 0/2.*gpt-4o-mini.*this shard differs: model"):
        label(sim, source, out, shard=Shard(1, 2), config=other)
    assert label(sim, source, out, shard=Shard(1, 2), config=other, force=True).exit_code == 0


def test_dry_run_of_a_shard_counts_exactly_what_it_sends(sim: Any, tmp_path: Path) -> None:
    """--dry-run --shard counts the shard's rows only, and the run then sends exactly that many."""
    source = write_csv(tmp_path / "in.csv", reviews(120))
    out = tmp_path / "out.jsonl"
    mine = sum(shard_of(r[0], 4) == 2 for r in reviews(120))
    planned = cli(*shard_args(sim, source, out, "2/4", "--dry-run", "--no-dedupe"))  # by id
    assert planned.returncode == 0, planned.stderr
    assert f"{mine} rows to label" in planned.stdout
    assert f"shard 2/4: {120 - mine} rows of the input belong to other shards" in planned.stdout
    assert not list(tmp_path.glob("out*"))
    assert cli(*shard_args(sim, source, out, "2/4", "--no-dedupe")).returncode == 0
    assert sim.stats()["requests"] == mine


def test_relabel_changed_in_a_parquet_shard_rewrites_only_its_own_parts(sim: Any, tmp_path: Path) -> None:
    """--relabel-changed in one shard drops its changed rows by rewriting its parts; siblings are untouched."""
    rows = reviews(100)
    out = tmp_path / "out.parquet"
    for k in range(2):
        label(sim, write_csv(tmp_path / "in.csv", rows), out, shard=Shard(k, 2), checkpoint_rows=10, dedupe=False)
    sibling_parts = sorted(p.name for p in out.iterdir() if part_shard(p.name) == Shard(1, 2))
    edited = [
        (i, lang, f"{text} (edited)" if shard_of(i, 2) == 0 and n % 5 == 0 else text)
        for n, (i, lang, text) in enumerate(rows)
    ]
    changed = sum(a[2] != b[2] for a, b in zip(rows, edited, strict=True))
    sim.reset()
    summary = label(sim, write_csv(tmp_path / "in.csv", edited), out, shard=Shard(0, 2), relabel_changed=True,
                    dedupe=False)  # fmt: skip
    assert summary.labeled == changed == sim.stats()["requests"] > 0
    assert sorted(p.name for p in out.iterdir() if part_shard(p.name) == Shard(1, 2)) == sibling_parts
    assert sorted(all_ids(out)) == sorted(r[0] for r in rows)


def test_a_drop_interrupted_after_its_journal_is_finished_by_the_next_run(tmp_path: Path, sim: Any) -> None:
    """A crash between the drop journal and its last rename is rolled forward: no row twice, none of the rest lost."""
    source = write_csv(tmp_path / "in.csv", reviews(60))
    out = tmp_path / "out.parquet"
    label(sim, source, out, shard=Shard(0, 2), checkpoint_rows=7)
    sink = ParquetSink(out, Shard(0, 2))
    sink.load_done()
    ids = [r["id"] for r in sink.iter_records(columns=["id"])]
    keep, doomed = ids[:5], ids[5:]  # the first part (7 rows) is rewritten, the others go whole

    def crash() -> bool:
        raise RuntimeError("killed right after the journal was written")

    sink._finish_drop = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        sink.drop_ids(IdSet.bulk((i, 0) for i in doomed)[0])
    survivor = ParquetSink(out, Shard(0, 2))
    assert len(survivor.load_done()) == 5
    assert "finished dropping superseded records" in " ".join(survivor.notes)
    assert sorted(r["id"] for r in survivor.iter_records(columns=["id"])) == sorted(keep)


@pytest.mark.parametrize("name", SINKS)
def test_export_reads_every_shard_as_one(sim: Any, tmp_path: Path, name: str) -> None:
    """`export` of a sharded output joins the labels of all shards back onto the input rows."""
    rows = reviews(50)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    for k in range(3):
        label(sim, source, out, shard=Shard(k, 3))
    result = cli("export", str(out), "--input", str(source), "--to", str(tmp_path / "labeled.csv"))
    assert result.returncode == 0, result.stderr
    assert "50 rows, 50 labeled" in result.stdout


@pytest.mark.slow
def test_status_tells_done_running_stale_and_not_started_shards(sim: Any, tmp_path: Path) -> None:
    """`status` of 4 shards: totals, and each shard done, running (with ETA), stale after kill -9, or not started."""
    rows = reviews(3000)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    assert cli(*shard_args(sim, source, out, "0/4")).returncode == 0
    sim.configure(latency_ms=50)
    slow = ("--concurrency", "4", "--checkpoint-every", "5", "--checkpoint-seconds", "0.2")
    killed = start_cli(*shard_args(sim, source, out, "1/4", *slow))
    running = start_cli(*shard_args(sim, source, out, "2/4", *slow))
    try:
        meta = tmp_path / "out.jsonl.meta"
        for k in (1, 2):
            wait_for(lambda k=k: progress_of(meta, k).get("saved", 0) >= 10, what=f"shard {k} saving")
        killed.kill()
        killed.communicate(timeout=30)
        wait_for(lambda: progress_of(meta, 2).get("eta_s") is not None, what="an ETA for shard 2")
        report = sink_status(out)
        shown = cli("status", str(out))
    finally:
        running.kill()
        running.communicate(timeout=30)
    assert report["shards_by_state"] == {"done": ["0/4"], "stale": ["1/4"], "running": ["2/4"], "not started": ["3/4"]}
    per_shard = {s["shard"]: s for s in report["shards"]}
    assert per_shard["0/4"]["labeled"] == sum(text_shard(r[2], 4) == 0 for r in rows)
    assert report["labeled"] == sum(s["labeled"] for s in report["shards"])
    assert per_shard["2/4"]["eta_s"] is not None and report["eta_s"] is not None
    assert per_shard["3/4"]["labeled"] == 0
    assert shown.returncode == 0, shown.stderr
    assert "4 shards: 1 done (0), 1 not started (3), 1 running (2), 1 stale (1)" in shown.stdout
    assert "shard 1/4: stale" in shown.stdout


def progress_of(meta: Path, k: int) -> dict[str, Any]:
    try:
        return dict(orjson.loads((meta / f"shard-{k}-of-4" / "progress.json").read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_compact_merges_a_finished_sharded_dataset_into_one_sink(sim: Any, tmp_path: Path) -> None:
    """`compact` refuses unfinished shards; once all are done it makes one ordinary sink that resumes as one."""
    rows = reviews(90)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    for k in range(2):
        assert cli(*shard_args(sim, source, out, f"{k}/3", "--checkpoint-every", "5")).returncode == 0
    refused = cli("compact", str(out))
    assert refused.returncode == 2 and "shards 2/3 (not started) have not finished" in refused.stderr
    assert cli(*shard_args(sim, source, out, "2/3", "--checkpoint-every", "5")).returncode == 0
    merged = cli("compact", str(out))
    assert merged.returncode == 0, merged.stderr
    assert all(part_shard(p.name) is None for p in out.iterdir())
    assert not list((tmp_path / "out.parquet.meta").glob("shard-*"))
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(r[0] for r in rows)
    assert "shards" not in sink_status(out)
    sim.reset()
    assert cli(*shard_args(sim, source, out, "0/3")).returncode == 2  # now one sink: shards are refused
    again = cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert sim.stats()["requests"] == 0


def test_an_interrupted_merge_is_refused_by_runs_and_finished_by_compact(sim: Any, tmp_path: Path) -> None:
    """While the merge marker is there every run refuses and points at `compact`, which finishes the merge."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.parquet"
    for k in range(2):
        label(sim, source, out, shard=Shard(k, 2))
    (tmp_path / "out.parquet.meta" / MERGING).write_bytes(orjson.dumps({"shards": 2}))
    for shard in (Shard(0, 2), None):
        with pytest.raises(SinkError, match="compact"):
            label(sim, source, out, shard=shard)
    assert cli("compact", str(out)).returncode == 0
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(r[0] for r in reviews(30))


@pytest.mark.crash
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_shards_killed_at_random_moments_end_with_every_id_once(sim: Any, tmp_path: Path) -> None:
    """4 shard processes write one Parquet directory; each is SIGKILLed at random moments and restarted. Every
    reader sees no id twice and no foreign id at any time, and the end holds every id exactly once."""
    rng = random.Random("four-shards")
    sim.configure(latency_ms=50)
    rows = reviews(4000)
    wanted = {r[0]: text_shard(r[2], 4) for r in rows}  # dedupe on: rows go to the shard of their text
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    # 4 in flight at 50 ms: at most ~80 rows/s a shard, so each shard's 1,000 rows take several runs.
    args = ("--concurrency", "4", "--checkpoint-every", "25", "--checkpoint-seconds", "0.2")

    def start(k: int) -> tuple[Any, float]:
        # The moment of each kill is random (not synchronisation: any moment must be safe).
        return start_cli(*shard_args(sim, source, out, f"{k}/4", *args)), time.monotonic() + rng.uniform(0.5, 3.0)

    procs = {k: start(k) for k in range(4)}
    kills = collections.Counter[int]()
    while procs:
        for k, (proc, kill_at) in list(procs.items()):
            if proc.poll() is not None:
                _, stderr = proc.communicate()
                assert proc.returncode == 0, stderr
                del procs[k]
            elif time.monotonic() >= kill_at:
                proc.kill()
                proc.communicate(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                kills[k] += 1
                check_parts(out, wanted)
                procs[k] = start(k) if kills[k] < 3 else (start_cli(*shard_args(sim, source, out, f"{k}/4")), 1e18)
        time.sleep(0.05)
    assert sum(kills.values()) >= 8, kills
    check_parts(out, wanted)
    seen = ds.dataset(out, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(seen) == sorted(wanted)
    assert all(p.name.endswith(".parquet") for p in out.iterdir())
    meta = tmp_path / "out.parquet.meta"
    for k in range(4):
        assert progress_of(meta, k)["state"] == "done"
        assert not list((meta / f"shard-{k}-of-4" / "tmp").glob("*.tmp"))


def text_shard(text: str, count: int) -> int:
    """The shard of a row with this text when dedupe is on (the default): SENTIMENT sends the text as it is."""
    return key_shard(int(text_sha(text), 16), count)


def check_parts(out: Path, wanted: dict[str, int]) -> None:
    """No id twice in the directory, no id outside the input, and every part holds only its own shard's ids
    (`wanted`: id → its shard)."""
    seen: list[str] = []
    if not out.exists():
        return
    for part in out.iterdir():
        shard = part_shard(part.name)
        assert isinstance(shard, Shard), part.name
        ids = pq.read_table(part, columns=["id"]).column("id").to_pylist()
        assert all(wanted.get(i) == shard.index for i in ids), f"a foreign id in {part.name}"
        seen += ids
    assert len(seen) == len(set(seen)), "an id was written twice"
    assert set(seen) <= set(wanted)
