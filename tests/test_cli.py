"""The real CLI in a subprocess: seed flags, exit codes, one-line errors, and Ctrl-C/SIGTERM that keep the work."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    ROOT,
    TEST_KEY,
    cli,
    cli_env,
    dead_letters,
    ids_once,
    label_args,
    progress,
    reviews,
    sink_ids,
    start_cli,
    wait_for,
    write_csv,
)


def test_seed_flags_work_without_a_subcommand(sim: Any, tmp_path: Path) -> None:
    """The old script's flags (--input_csv, --max_concurrent, --mode test, --model) label 50 rows."""
    source = write_csv(tmp_path / "in.csv", reviews(80))
    out = tmp_path / "seed.jsonl"
    result = cli(
        "--input_csv", str(source), "--max_concurrent", "4", "--mode", "test", "--model", "gpt-4o-mini",
        "--output", str(out), "--base-url", sim.base_url, "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(ids_once(out)) == 50
    assert sim.stats()["max_in_flight"] <= 4
    assert "labelstream done: 50 labeled" in result.stderr


def test_skip_labeled_false_starts_over_and_keeps_the_old_sink(sim: Any, tmp_path: Path) -> None:
    """--skip_labeled False relabels everything into a fresh sink; the previous one is kept as a backup."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, source, out)).returncode == 0
    result = cli(*label_args(sim, source, out, "--skip_labeled", "False"))
    assert result.returncode == 0, result.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(10))
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("out.jsonl.bak-") and p.is_file()]
    assert len(backups) == 1 and len(backups[0].read_text().splitlines()) == 10
    assert "moved the previous output" in result.stderr
    assert sim.stats()["requests"] == 20


def test_skip_labeled_true_resumes(sim: Any, tmp_path: Path) -> None:
    """--skip_labeled True (the default) resumes: a second run makes no request."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    out = tmp_path / "out.jsonl"
    cli(*label_args(sim, source, out))
    sim.reset()
    assert cli(*label_args(sim, source, out, "--skip_labeled", "True")).returncode == 0
    assert sim.stats()["requests"] == 0


def test_exit_code_1_when_rows_are_dead_lettered(sim: Any, tmp_path: Path) -> None:
    """Exit 1 when some rows were dead-lettered, and the summary says how to retry them."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    sim.script([{"kind": "status", "status": 500, "count": -1, "match": "review 2:"}])
    out = tmp_path / "out.jsonl"
    result = cli(*label_args(sim, source, out, "--max-retries", "1"))
    assert result.returncode == 1
    assert "server_error ×1" in result.stderr
    assert "to retry the 1 failed rows, re-run" in result.stderr
    assert [d["id"] for d in dead_letters(out)] == ["r00002"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "test", "--limit", "7"], "--mode test means --limit 50"),
        (["--config", "nope.toml"], "config file nope.toml not found"),
        (["--output", "out.txt"], "use a name ending in .jsonl or .parquet"),
        (["--concurrency", "0"], "expected a number ≥ 1"),
        (["--encoding", "bogus"], "unknown --encoding 'bogus'"),
        (["--delimiter", "ab"], "--delimiter must be one character"),
        (["--id-column", "review_id"], "id column 'review_id' not found"),
        (["--grace", "-1"], "--grace: expected a number ≥ 0, got -1"),
        (["--grace", "nan"], "--grace: expected a finite number"),
        (["--timeout", "0"], "--timeout: expected a number > 0"),
        (["--max-retries", "-1"], "--max-retries: expected a number ≥ 0"),
        (["--checkpoint-seconds", "inf"], "--checkpoint-seconds: expected a finite number"),
        (["--no-progress", "--quiet"], "not allowed with argument"),
        (["--relabel-changed", "--skip_labeled", "False"], "Pass one of them"),
    ],
)
def test_usage_errors_exit_2_with_one_line(sim: Any, tmp_path: Path, args: list[str], message: str) -> None:
    """Usage and config mistakes exit 2 with one line that names the problem; no traceback."""
    source = write_csv(tmp_path / "in.csv", reviews(3))
    base = ["label", "--input", str(source), "--base-url", sim.base_url, "--no-progress"]
    if "--output" not in args:
        base += ["--output", str(tmp_path / "out.jsonl")]
    result = cli(*base, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["requests"] == 0


def test_missing_key_for_a_remote_endpoint_fails_before_any_work(tmp_path: Path) -> None:
    """Without OPENAI_API_KEY, a non-local endpoint is refused in one line before the sink is touched."""
    source = write_csv(tmp_path / "in.csv", reviews(3))
    out = tmp_path / "out.jsonl"
    result = cli("label", "--input", str(source), "--output", str(out), env={"OPENAI_API_KEY": ""})
    assert result.returncode == 2
    assert "OPENAI_API_KEY is not set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.jsonl.meta").exists()


def test_wrong_key_stops_early_and_never_shows_the_key(sim: Any, tmp_path: Path) -> None:
    """A 401 stops the run with one message that does not contain the key, in output or in any file."""
    sim.configure(api_key="sk-the-right-key-000000000000")
    source = write_csv(tmp_path / "in.csv", reviews(200))
    out = tmp_path / "out.jsonl"
    result = cli(*label_args(sim, source, out))
    assert result.returncode == 2
    assert "rejected the API key" in result.stderr
    assert sim.stats()["requests"] <= 12  # the first window of 10, and a slot or two freed before the stop lands
    everything = result.stdout + result.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            everything += path.read_text(errors="replace")
    assert TEST_KEY not in everything
    assert TEST_KEY[:12] not in everything


@pytest.mark.crash
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_signal_stops_gracefully_and_the_rerun_completes_exactly_once(
    sim: Any, tmp_path: Path, sig: signal.Signals, name: str
) -> None:
    """Ctrl-C/SIGTERM: in-flight rows finish, the sink is flushed, exit 130 with a resume hint; the rerun finishes."""
    sim.configure(latency_ms=100)
    rows = reviews(3000)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    proc = start_cli(*label_args(sim, source, out, "--concurrency", "20", "--checkpoint-every", "50"))
    wait_for(lambda: progress(out).get("labeled", 0) >= 100, what="100 rows labeled")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "stopping: finishing in-flight requests" in stderr
    assert "labelstream interrupted" in stderr
    assert "resume with: labelstream label" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Unclosed" not in stderr
    saved = sink_ids(out)
    assert 100 <= len(saved) < 3000
    assert len(saved) == len(set(saved))
    assert progress(out)["state"] == "interrupted"
    sim.configure(latency_ms=0)
    result = cli(*label_args(sim, source, out, "--concurrency", "50"))
    assert result.returncode == 0, result.stderr
    final = sink_ids(out)
    assert sorted(final) == sorted(r[0] for r in rows)


@pytest.mark.crash
def test_second_ctrl_c_stops_at_once_with_a_readable_sink(sim: Any, tmp_path: Path) -> None:
    """A second Ctrl-C does not wait for hung requests; what was saved stays readable and resumable."""
    source = write_csv(tmp_path / "in.csv", reviews(4000))
    out = tmp_path / "out.jsonl"
    sim.configure(latency_ms=20)
    proc = start_cli(*label_args(sim, source, out, "--concurrency", "10", "--checkpoint-every", "10", "--grace", "600"))
    wait_for(lambda: progress(out).get("saved", 0) >= 20, what="20 rows saved")
    sim.script([{"kind": "hang", "count": -1}])  # from now on nothing finishes: only a hard stop can end it
    arrived = sim.stats(events=False)["requests"]

    def all_hung() -> bool:
        # Requests sent before the hang may still be under way on a busy machine: ten in flight are all hung only once
        # every one of those has finished.
        stats = sim.stats(events=False)
        return sum(stats["by_status"].values()) >= arrived and stats["in_flight"] >= 10

    wait_for(all_hung, what="every worker waiting on a hung request")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: progress(out).get("state") == "stopping", what="the first Ctrl-C to be handled")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Unclosed" not in stderr
    saved = sink_ids(out)
    assert len(saved) == len(set(saved)) >= 20
    sim.reset()
    assert cli(*label_args(sim, source, out)).returncode == 0
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(4000))


def test_make_label_runs_the_cli(sim: Any, tmp_path: Path) -> None:
    """`make label INPUT=... OUTPUT=... CONCURRENCY=... ARGS=...` labels the file through the real CLI."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "made.parquet"
    result = subprocess.run(
        [
            "make",
            "-s",
            "label",
            f"INPUT={source}",
            f"OUTPUT={out}",
            "CONCURRENCY=5",
            f"ARGS=--base-url {sim.base_url} --no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(30))
    assert sim.stats()["max_in_flight"] <= 5


def test_dry_run_counts_the_work_and_touches_nothing(sim: Any, tmp_path: Path) -> None:
    """--dry-run reports rows to label and the first request, sends nothing and creates no file."""
    source = write_csv(tmp_path / "in.csv", [*reviews(12), ("bad", "en", " ")])
    out = tmp_path / "out.parquet"
    result = cli(*label_args(sim, source, out, "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "12 rows to label, 0 already in the sink" in result.stdout
    assert "1 rows that would be dead-lettered" in result.stdout
    assert "[user] review 0: fine" in result.stdout
    assert sim.stats()["requests"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_status_export_and_compact(sim: Any, tmp_path: Path, name: str) -> None:
    """status counts labeled and failed rows; export joins labels back in input order; compact merges parts."""
    rows = reviews(40)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    sim.script([{"kind": "label_outside", "count": -1, "match": "review 6:"}])
    assert cli(*label_args(sim, source, out, "--max-retries", "0", "--checkpoint-every", "10")).returncode == 1

    status = cli("status", str(out), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["labeled"], report["failed_unlabeled"]) == (39, 1)
    assert report["failures_by_kind"] == {"invalid_label": 1}
    assert report["progress"]["state"] == "done"
    assert "39 labeled, 1 failed" in cli("status", str(out)).stdout

    exported = tmp_path / "labeled.csv"
    result = cli("export", str(out), "--input", str(source), "--to", str(exported))
    assert result.returncode == 0, result.stderr
    assert "40 rows, 39 labeled, 1 without a label" in result.stdout
    with exported.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == [r[0] for r in rows]  # input order
    assert [r["id"] for r in table if not r["label"]] == ["r00006"]

    if name.endswith(".parquet"):
        compacted = cli("compact", str(out))
        assert compacted.returncode == 0, compacted.stderr
        assert "parts → 1" in compacted.stdout
        assert len(list(out.iterdir())) == 1
        assert sorted(sink_ids(out)) == sorted(r[0] for r in rows if r[0] != "r00006")
    else:
        assert cli("compact", str(out)).returncode == 2


@pytest.mark.crash
@pytest.mark.parametrize("delay", [0.15, 0.3, 0.5, 0.8, 1.2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_start_up_ends_with_exit_130_and_no_traceback(
    sim: Any, tmp_path: Path, delay: float, sig: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM while the CLI loads the SDK or prepares the sink: one line (or the run's summary), exit 130."""
    sim.configure(latency_ms=200)
    source = write_csv(tmp_path / "in.csv", reviews(3000))
    out = tmp_path / "out.jsonl"
    proc = start_cli(*label_args(sim, source, out, "--concurrency", "5"))
    time.sleep(delay)  # the moment is the variable under test, not a wait for something to happen
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    if "stopping:" not in stderr:  # the signal came before the run took over: one line says it all
        assert stderr.strip().splitlines() == ["labelstream: interrupted; re-run the same command to resume."]
    saved = sink_ids(out)
    assert len(saved) == len(set(saved))


def test_no_progress_logs_plain_lines_and_quiet_prints_nothing(sim: Any, tmp_path: Path) -> None:
    """--no-progress prints periodic plain lines (the first with the first row); --quiet prints nothing on success."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    logged = cli(*label_args(sim, source, tmp_path / "a.jsonl"))
    assert logged.returncode == 0, logged.stderr
    assert re.search(r"^labelstream: \d+/~?\d+ rows \| \d+ done", logged.stderr, re.MULTILINE), logged.stderr
    quiet = cli(*[a for a in label_args(sim, source, tmp_path / "b.jsonl") if a != "--no-progress"], "--quiet")
    assert quiet.returncode == 0
    assert quiet.stderr == "" and quiet.stdout == ""
    assert len(sink_ids(tmp_path / "b.jsonl")) == 30


def test_the_progress_total_is_the_row_count_not_the_line_count(sim: Any, tmp_path: Path) -> None:
    """Quoted newlines make 300 rows span 900 lines; the total shown (and in the progress file) is 300, then 200."""
    rows = [(f"r{i:04d}", "en", f"line one of {i}\nline two\nline three") for i in range(300)]
    source = write_csv(tmp_path / "in.csv", rows)
    assert source.read_text(encoding="utf-8").count("\n") > 900
    out = tmp_path / "out.jsonl"
    first = cli(*label_args(sim, source, out, "--limit", "100"))
    assert first.returncode == 0, first.stderr
    assert (progress(out)["expected"], progress(out)["expected_exact"]) == (100, True)
    second = cli(*label_args(sim, source, out))
    assert second.returncode == 0, second.stderr
    assert (progress(out)["expected"], progress(out)["labeled"]) == (200, 200)
    assert "/200 rows" in second.stderr


def test_dry_run_counts_exactly_what_the_run_sends(sim: Any, tmp_path: Path) -> None:
    """With unusable rows first and --limit, the dry run's count equals the requests the real run makes."""
    bad = [(f"bad{i}", "en", " ") for i in range(5)]
    source = write_csv(tmp_path / "in.csv", [*bad, *reviews(30)])
    out = tmp_path / "out.jsonl"
    planned = cli(*label_args(sim, source, out, "--limit", "10", "--dry-run"))
    assert planned.returncode == 0, planned.stderr
    assert "10 rows to label" in planned.stdout
    assert "5 rows that would be dead-lettered" in planned.stdout
    assert sim.stats()["requests"] == 0
    real = cli(*label_args(sim, source, out, "--limit", "10"))
    assert real.returncode == 1  # the five unusable rows are dead letters
    assert sim.stats()["requests"] == 10 == len(sink_ids(out))


def test_export_refuses_to_overwrite_its_input_and_writes_lists_as_json(sim: Any, tmp_path: Path) -> None:
    """--to the input is refused; multi-labels are a JSON list in CSV (labels may hold ';'); ragged rows are named."""
    source = tmp_path / "in.csv"
    source.write_text("ticket_id,subject,body\n1,a,b\n2,c,d,extra\n3,e,f\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    labeled = cli(*label_args(sim, source, out, "--config", "configs/topics.toml"))
    assert labeled.returncode == 1, labeled.stderr  # the ragged row is dead-lettered
    refused = cli("export", str(out), "--input", str(source), "--to", str(source))
    assert refused.returncode == 2 and "would overwrite it" in refused.stderr
    assert source.read_text(encoding="utf-8").startswith("ticket_id,subject,body")
    exported = tmp_path / "labeled.csv"
    result = cli("export", str(out), "--input", str(source), "--to", str(exported))
    assert result.returncode == 0, result.stderr
    assert "1 rows had more fields than the header (rows 2" in result.stderr
    with exported.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["ticket_id"] for r in table] == ["1", "2", "3"]
    sunk = {r["id"]: r["label"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert sorted(sunk) == ["1", "3"] and all(isinstance(labels, list) and labels for labels in sunk.values())
    assert [json.loads(r["label"]) if r["label"] else None for r in table] == [sunk["1"], None, sunk["3"]]
