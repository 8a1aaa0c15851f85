"""Misbehaving models and servers, full disks, secrets: retried, dead-lettered or a clear stop; never a crash."""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli as cli_module
from pipeline.commands import sinks as sinks_commands
from pipeline.errors import ExitCode
from pipeline.ratelimit.limiter import RetryPolicy
from pipeline.run.progress import Reporter
from pipeline.sinks import open_sink
from pipeline.stats import CallStats, RunStats

from .helpers import ROOT, TEST_KEY, cli, cli_env, dead_letters, label, progress, reviews, sink_ids, write_csv

RETRY = RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=2.0)


@pytest.mark.parametrize(
    ("kind", "dead_kind", "attempts"),
    [
        ("bad_json_content", "invalid_json", 3),
        ("label_outside", "invalid_label", 3),
        ("empty_content", "empty_reply", 3),
        ("length", "length", 2),  # one roomier retry, not every retry: the same request is cut off the same way
        ("content_filter", "content_filter", 3),
        ("refusal", "refusal", 3),
        ("not_json", "malformed", 3),
    ],
)
def test_model_misbehaviour_is_retried_then_dead_lettered(
    sim: Any, tmp_path: Path, kind: str, dead_kind: str, attempts: int
) -> None:
    """A row whose every reply is unusable is retried, then dead-lettered with the reason; other rows are labeled."""
    sim.script([{"kind": kind, "count": -1, "match": "review 2:"}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(5)), out, retry=RETRY)
    [letter] = dead_letters(out)
    assert (letter["id"], letter["kind"], letter["attempts"]) == ("r00002", dead_kind, attempts)
    assert summary.labeled == 4 and summary.failed == 1


@pytest.mark.parametrize("kind", [*("bad_json_content", "label_outside", "empty_content", "length"), "not_json"])
def test_one_bad_reply_is_retried_and_the_row_labeled(sim: Any, tmp_path: Path, kind: str) -> None:
    """A single unusable reply costs one retry; the row still ends labeled, with attempts = 2."""
    sim.script([{"kind": kind, "count": 1}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(1)), out, retry=RETRY)
    assert summary.exit_code == 0
    [record] = list(open_sink(out).iter_records())
    assert record["attempts"] == 2


def test_extra_text_around_the_json_is_accepted(sim: Any, tmp_path: Path) -> None:
    """Prose around a valid JSON answer ("Sure! {...}") is accepted when the label is in the set (no retry)."""
    sim.script([{"kind": "extra_text", "count": -1}])
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(5)), tmp_path / "out.jsonl", retry=RETRY)
    assert summary.exit_code == 0 and summary.retries == 0


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 500, "count": 2},
        {"kind": "status", "status": 502, "count": 2},
        {"kind": "status", "status": 503, "count": 2},
        {"kind": "status", "status": 408, "count": 2},
        {"kind": "reset", "count": 2},
        {"kind": "close_after_headers", "count": 2},
        {"kind": "hang", "count": 1, "seconds": 30},
        {"kind": "slow_body", "count": 1, "seconds": 30},
    ],
    ids=lambda f: f"{f['kind']}-{f.get('status', '')}",
)
def test_server_misbehaviour_is_retried(sim: Any, tmp_path: Path, fault: dict[str, Any]) -> None:
    """5xx bursts, resets, closes after headers, hangs and slow bodies past the timeout are retried until labeled."""
    sim.script([fault])
    retry = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=1.0)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(3)), out, concurrency=1, retry=retry)
    assert summary.exit_code == 0, summary.render()
    assert sorted(sink_ids(out)) == ["r00000", "r00001", "r00002"]
    assert summary.retries == fault["count"]


def run_with_file_limit(args: list[str], limit_bytes: int) -> subprocess.CompletedProcess[str]:
    """Run the CLI with RLIMIT_FSIZE, so writes past `limit_bytes` fail like a full disk (EFBIG)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=cli_env(),
        preexec_fn=cap,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_full_disk_stops_clearly_keeps_the_sink_and_resumes(sim: Any, tmp_path: Path, name: str) -> None:
    """When writes fail midway: exit 3 with a clear message, a readable sink, and a full resume once space is back."""
    rows = reviews(600)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    args = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress",
            "--checkpoint-every", "200"]  # fmt: skip
    assert cli(*args, "--limit", "100").returncode == 0  # finished work that must survive the failure
    # JSONL: the sink file may grow a little more; Parquet: no new part (a 200-row part) fits.
    result = run_with_file_limit(args, out.stat().st_size + 8_000 if out.is_file() else 2_000)
    assert result.returncode == 3, result.stderr
    assert "cannot write" in result.stderr and "File too large" in result.stderr
    assert "re-run the same command to resume" in result.stderr
    assert "Traceback" not in result.stderr
    partial = sink_ids(out)
    assert len(partial) == len(set(partial))
    assert 100 <= len(partial) < 600
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)


def test_the_key_never_appears_anywhere(sim: Any, tmp_path: Path) -> None:
    """With a recognisable key, no sink, side file, progress file, log line or error shows it, even for 401s."""
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.jsonl"
    sim.script([
        {"kind": "status", "status": 500, "count": -1, "match": "review 2:", "message": f"echo {TEST_KEY}"},
        {"kind": "label_outside", "count": -1, "match": "review 4:"},
    ])  # fmt: skip
    base = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--max-retries", "1"]
    first = cli(*base)  # progress on: plain log lines, since stderr is not a terminal
    sim.configure(api_key="sk-the-right-one-0000000000000000")
    second = cli(*[*base, "--no-progress"])
    assert first.returncode == 1 and second.returncode == 2
    assert "rejected the API key" in second.stderr
    everything = first.stdout + first.stderr + second.stdout + second.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            everything += path.read_text(errors="replace")
    assert TEST_KEY not in everything
    assert TEST_KEY[:8] not in everything and TEST_KEY[-12:] not in everything
    assert progress(out)["state"] == "failed"


def test_a_bug_shows_its_traceback_without_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unexpected exception prints its traceback (it is a bug) with the key redacted, and exits 70."""
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)

    def broken(*_: Any) -> int:
        raise RuntimeError(f"something broke while using {TEST_KEY}")

    monkeypatch.setattr(sinks_commands, "run_status", broken)
    assert cli_module.main(["status", "whatever.jsonl"]) == ExitCode.BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "something broke" in err
    assert TEST_KEY not in err


def test_progress_lines_when_not_a_terminal() -> None:
    """Without a TTY the progress bar becomes plain periodic log lines on stderr."""
    stream = io.StringIO()
    stats = RunStats(calls=CallStats(), model="gpt-4o-mini", expected=10)
    stats.labeled = 4
    reporter = Reporter(stats, stream=stream, log_every=0)
    reporter.update()
    assert stream.getvalue().startswith("labelstream: 4/~10 rows | 4 done | 0 failed"), "an estimate shows as ~"
    stats.expected_exact = True
    reporter.update()
    assert stream.getvalue().splitlines()[-1].startswith("labelstream: 4/10 rows | 4 done")
    quiet = io.StringIO()
    Reporter(stats, mode="off", stream=quiet, log_every=0).update()
    assert quiet.getvalue() == ""
