"""`--procs N`: N shard processes under one parent, one progress display, one summary, signals passed on."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.errors import ExitCode
from pipeline.input.shards import Shard
from pipeline.run.procs import split_limit, worst_exit
from pipeline.sinks import SinkMeta, open_shards

from .helpers import ROOT, cli, label_args, reviews, start_cli, wait_for, write_csv


def procs_args(sim: Any, source: Path, output: Path, *extra: str) -> list[str]:
    return label_args(sim, source, output, "--procs", "2", *extra)


def all_ids(output: Path) -> list[str]:
    return [r["id"] for sink in open_shards(output) for r in sink.iter_records(columns=["id"])]


def shard_progress(output: Path, k: int, n: int = 2) -> dict[str, Any]:
    try:
        return dict(orjson.loads(SinkMeta(output, Shard(k, n)).progress_path.read_bytes()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}


def test_worst_exit_and_limit_split() -> None:
    """The parent's code is the worst child's (a crash or signal above storage, usage, Ctrl-C, dead letters)."""
    assert worst_exit([0, 1, 0]) == 1
    assert worst_exit([130, 1]) == 130
    assert worst_exit([130, 2, 1]) == 2
    assert worst_exit([3, 2]) == 3
    assert worst_exit([0, -9, 3]) == 137
    assert split_limit(7, 3) == [3, 2, 2] and split_limit(1, 2) == [1, 0] and split_limit(None, 2) == [None, None]


@pytest.mark.parametrize(
    ("codes", "worst"),
    [
        ([ExitCode.OK, ExitCode.DEAD_LETTERS], ExitCode.DEAD_LETTERS),
        ([ExitCode.DEAD_LETTERS, ExitCode.INTERRUPTED], ExitCode.INTERRUPTED),
        ([ExitCode.INTERRUPTED, ExitCode.BUDGET], ExitCode.BUDGET),
        ([ExitCode.OK, ExitCode.BUDGET], ExitCode.BUDGET),
        ([ExitCode.BUDGET, ExitCode.USAGE], ExitCode.USAGE),
        ([ExitCode.USAGE, ExitCode.BUDGET], ExitCode.USAGE),
        ([ExitCode.BUDGET, ExitCode.STORAGE], ExitCode.STORAGE),
        ([ExitCode.STORAGE, ExitCode.BUG], ExitCode.BUG),
        ([ExitCode.BUDGET, -9], 137),
    ],
)
def test_a_shard_stopped_by_each_cause_gives_the_parent_its_code(codes: list[int], worst: int) -> None:
    """A shard stopped at its part of --max-cost exits the parent with 4 over Ctrl-C, under a usage error."""
    assert worst_exit(codes) == worst


@pytest.mark.parametrize("code", [c for c in ExitCode if c is not ExitCode.BUG])
def test_every_exit_code_is_ranked(code: ExitCode) -> None:
    """Every documented exit code ranks below an unknown one (a bug, a signal), none counts as a crash."""
    assert worst_exit([code, 99]) == 99 and worst_exit([code, ExitCode.OK]) == code


@pytest.mark.slow
@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_procs_2_labels_every_id_once_with_one_summary(sim: Any, tmp_path: Path, name: str) -> None:
    """--procs 2: two shard children label every row once; the parent prints one summary and each child took 1/2."""
    rows = reviews(400)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    result = cli(*procs_args(sim, source, out, "--concurrency", "20"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("labelstream done: 400 labeled, 0 failed") == 1, result.stderr
    assert result.stderr.count("labelstream done") == 1
    assert sorted(all_ids(out)) == sorted(r[0] for r in rows)
    assert sim.stats()["requests"] == 400
    children = [shard_progress(out, k) for k in range(2)]
    assert [c["state"] for c in children] == ["done", "done"]
    assert [c["rate_share"] for c in children] == [0.5, 0.5]
    assert children[0]["pid"] != children[1]["pid"] != os.getpid()
    assert sum(c["labeled"] for c in children) == 400
    rerun = cli(*procs_args(sim, source, out))
    assert rerun.returncode == 0 and "0 labeled" in rerun.stderr and sim.stats()["requests"] == 400


@pytest.mark.slow
def test_procs_splits_limit_and_dry_run_plans_the_whole_run(sim: Any, tmp_path: Path) -> None:
    """--limit is for the whole run (split over the shards); --dry-run prints one plan for the run, sends nothing."""
    source = write_csv(tmp_path / "in.csv", reviews(200))
    out = tmp_path / "out.jsonl"
    planned = cli(*procs_args(sim, source, out, "--dry-run", "--max-cost", "5"))
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.count("dry run:") == 1 and "2 shard processes" in planned.stdout, planned.stdout
    assert "200 rows to label" in planned.stdout and planned.stdout.count("cost: standard") == 1
    assert (
        "--max-cost $5 (split over the 2 shards by their estimates: each stops at its part): within it"
        in planned.stdout
    )
    assert sim.stats()["requests"] == 0
    limited = cli(*procs_args(sim, source, out, "--limit", "31"))
    assert limited.returncode == 0, limited.stderr
    assert len(all_ids(out)) == 31 == sim.stats()["requests"]


@pytest.mark.crash
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_reaches_every_shard_once_and_the_rerun_completes(sim: Any, tmp_path: Path, sig: int) -> None:
    """Ctrl-C/SIGTERM on the parent: both children stop gracefully (one signal each), one summary, exit 130."""
    sim.configure(latency_ms=100)
    rows = reviews(3000)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.parquet"
    proc = start_cli(*procs_args(sim, source, out, "--concurrency", "10", "--checkpoint-every", "20"))
    for k in range(2):
        wait_for(lambda k=k: shard_progress(out, k).get("saved", 0) >= 20, what=f"shard {k} saving")
    pids = [shard_progress(out, k)["pid"] for k in range(2)]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.count("stopping 2 shard processes") == 1
    assert stderr.count("labelstream interrupted") == 1, stderr
    assert "resume with: labelstream label" in stderr and "--procs 2" in stderr
    assert "Traceback" not in stderr
    # Each child got the signal once, so it let its in-flight requests finish: none was abandoned (499).
    assert [shard_progress(out, k)["state"] for k in range(2)] == ["interrupted", "interrupted"]
    assert "499" not in sim.stats()["by_status"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    saved = all_ids(out)
    assert len(saved) == len(set(saved)) < 3000
    sim.configure(latency_ms=0)
    again = cli(*procs_args(sim, source, out, "--concurrency", "50"))
    assert again.returncode == 0, again.stderr
    assert sorted(all_ids(out)) == sorted(r[0] for r in rows)


def test_the_parent_exits_with_the_worst_childs_code(sim: Any, tmp_path: Path) -> None:
    """One shard cannot start (its lock is held): the other finishes, the error is shown once, the exit is 2."""
    source = write_csv(tmp_path / "in.csv", reviews(100))
    out = tmp_path / "out.jsonl"
    held = SinkMeta(out, Shard(1, 2))
    held.lock()
    try:
        result = cli(*procs_args(sim, source, out))
    finally:
        held.unlock()
    assert result.returncode == 2, result.stderr
    assert "[shard 1/2] labelstream: error: another labelstream run" in result.stderr
    assert result.stderr.count("labelstream done") == 1
    assert shard_progress(out, 0)["state"] == "done"


@pytest.mark.slow
def test_procs_refuses_an_output_of_another_layout(sim: Any, tmp_path: Path) -> None:
    """--procs 2 on an output of 3 shards is refused once, before any child starts; --skip_labeled False moves it."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.jsonl"
    assert cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url,
               "--shard", "0/3").returncode == 0  # fmt: skip
    refused = cli(*procs_args(sim, source, out))
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1
    assert "written by 3 shards" in refused.stderr
    restarted = cli(*procs_args(sim, source, out, "--skip_labeled", "False"))
    assert restarted.returncode == 0, restarted.stderr
    assert "moved the previous output" in restarted.stderr
    assert sorted(all_ids(out)) == sorted(r[0] for r in reviews(30))
    assert list(tmp_path.glob("out.shard-0-of-3.jsonl.bak-*"))


@pytest.mark.crash
def test_the_shards_stop_gracefully_when_the_parent_is_killed(sim: Any, tmp_path: Path) -> None:
    """kill -9 of the parent: the kernel sends each child SIGTERM, so none runs on unsupervised; each one saves."""
    sim.configure(latency_ms=100)
    source = write_csv(tmp_path / "in.csv", reviews(3000))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*procs_args(sim, source, out, "--concurrency", "10", "--checkpoint-every", "20"))
    for k in range(2):
        wait_for(lambda k=k: shard_progress(out, k).get("saved", 0) >= 20, what=f"shard {k} saving")
    proc.kill()
    proc.communicate(timeout=30)
    for k in range(2):
        wait_for(lambda k=k: shard_progress(out, k).get("state") == "interrupted", what=f"shard {k} to stop")
    saved = all_ids(out)
    assert len(saved) == len(set(saved)) == sum(shard_progress(out, k)["saved"] for k in range(2))


def test_a_shard_stopped_at_its_budget_ranks_under_a_shard_that_could_not_run(sim: Any, tmp_path: Path) -> None:
    """Shard 0 stops at its part of --max-cost (4), shard 1 cannot start (2): the parent exits 2, not as a crash."""
    source = write_csv(tmp_path / "in.csv", reviews(300))
    out = tmp_path / "out.jsonl"
    config = tmp_path / "sentiment.toml"  # room for hidden reasoning tokens in a reply's worst case
    text = (ROOT / "configs" / "sentiment.toml").read_text(encoding="utf-8")
    config.write_text(text.replace("max_tokens = 20", "max_tokens = 200"), encoding="utf-8")
    sim.configure(reasoning_tokens=150)
    held = SinkMeta(out, Shard(1, 2))
    held.lock()
    try:
        result = cli(*procs_args(sim, source, out, "--config", str(config), "--max-cost", "0.03"))
    finally:
        held.unlock()
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert shard_progress(out, 0)["state"] == "budget"
    assert "[shard 1/2] labelstream: error: another labelstream run" in result.stderr
