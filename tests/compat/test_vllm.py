"""labelstream against a real vLLM server (CPU build, tiny random-weight model) on loopback."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ..helpers import TEST_KEY, dead_letters, progress, sink_ids, start_cli, wait_for
from .common import CONFIG, LABELS, label_cli, long_row, records, sample_csv
from .servers import VLLM

ROWS = 40


@pytest.fixture(scope="module")
def labeled(vllm: VLLM, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path, Path]:
    """One labeling run of ROWS sample rows against vLLM: (exit code, output text, input, sink)."""
    folder = tmp_path_factory.mktemp("vllm-label")
    inp = sample_csv(folder / "in.csv", ROWS)
    out = folder / "out.jsonl"
    done = label_cli(vllm.base_url, inp, out, "--concurrency", "8")
    return done.returncode, done.stdout + done.stderr, inp, out


def test_labels_every_row(labeled: tuple[int, str, Path, Path]) -> None:
    """Every row is labeled once by a real vLLM server with one of the task's labels, and the run exits 0."""
    code, text, _, out = labeled
    assert code == 0, text
    rows = records(out)
    assert len(rows) == ROWS == len(set(sink_ids(out)))
    assert {r["label"] for r in rows} <= LABELS
    assert all(r["model"] == "tiny" for r in rows)
    sent = [r for r in rows if r.get("copied_from") is None]  # copies of a repeated text cost no tokens
    assert sent and all(r["completion_tokens"] > 0 for r in sent)


def test_confidence_despite_stop_token_in_logprobs(labeled: tuple[int, str, Path, Path]) -> None:
    """vLLM's logprobs.content ends with the stop token `</s>`; confidence is still read for every row."""
    code, text, _, out = labeled
    assert code == 0, text
    confidences = [r["confidence"] for r in records(out)]
    assert all(c is not None and 0 < c <= 1 for c in confidences), confidences


def test_resume_makes_zero_requests(vllm: VLLM, labeled: tuple[int, str, Path, Path]) -> None:
    """Re-running on a complete sink sends vLLM no request at all (counted by the server, not by labelstream)."""
    code, text, inp, out = labeled
    assert code == 0, text
    before = vllm.chat_requests()
    again = label_cli(vllm.base_url, inp, out, "--concurrency", "8")
    assert again.returncode == 0, again.stderr
    assert vllm.chat_requests() == before
    assert len(sink_ids(out)) == ROWS


def test_unknown_model_is_a_clear_error_and_leaves_the_sink_usable(vllm: VLLM, tmp_path: Path) -> None:
    """A model vLLM does not serve stops the run with exit 2 naming it and the served alias; the sink stays usable."""
    inp = sample_csv(tmp_path / "in.csv", 6)
    out = tmp_path / "out.jsonl"
    wrong = label_cli(vllm.base_url, inp, out, model="gpt-4o-mini")
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "gpt-4o-mini" in wrong.stderr
    assert "tiny" in wrong.stderr  # vLLM's reply lists its aliases; the user should see it
    assert dead_letters(out) == []
    # No lock held and no manifest pinned to the mistyped model: the corrected command just works.
    right = label_cli(vllm.base_url, inp, out)
    assert right.returncode == 0, right.stdout + right.stderr
    assert len(sink_ids(out)) == 6


def test_context_length_row_is_dead_lettered_after_one_attempt(vllm: VLLM, tmp_path: Path) -> None:
    """A row longer than the model's context is dead-lettered after one attempt with vLLM's reason; the rest label."""
    inp = sample_csv(tmp_path / "in.csv", 5, extra=[long_row()])
    out = tmp_path / "out.jsonl"
    done = label_cli(vllm.base_url, inp, out)
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(sink_ids(out)) == 5
    (letter,) = dead_letters(out)
    assert letter["id"] == "too-long"
    assert letter["attempts"] == 1
    assert letter["status"] == 400
    assert "maximum context length" in letter["message"]


def test_context_length_advice_does_not_say_rerun(vllm: VLLM, tmp_path: Path) -> None:
    """A context-length failure is deterministic: the summary advises shortening (max_chars), not re-running."""
    inp = sample_csv(tmp_path / "in.csv", 3, extra=[long_row()])
    out = tmp_path / "out.jsonl"
    done = label_cli(vllm.base_url, inp, out)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "max_chars" in text
    assert "to retry the 1 failed rows, re-run" not in text


def test_hung_server_sigstop_then_sigcont_run_completes(vllm: VLLM, tmp_path: Path) -> None:
    """vLLM frozen mid-run (SIGSTOP) and thawed (SIGCONT): labelstream times out, retries, and labels every row once."""
    rows = 200  # ~10 s of requests at 4 in flight on a warm server: the freeze lands mid-run
    inp = sample_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    args = ["--input", str(inp), "--output", str(out), "--config", str(CONFIG), "--model", "tiny"]
    args += ["--base-url", vllm.base_url, "--concurrency", "4", "--timeout", "15", "--no-progress"]
    # Every row a request: the sample repeats its texts, and with dedupe a warm server can answer every request of
    # 60 rows before the freeze, leaving none to time out (the likely cause of two failures of make test-compat:
    # frozen 2 s in, then no retry in 120 s).
    args += ["--no-dedupe"]
    proc = start_cli("label", *args, env={"OPENAI_API_KEY": TEST_KEY})
    stopped = False
    try:
        wait_for(lambda: progress(out).get("labeled", 0) >= 5, timeout=180, what="the first labeled rows")
        vllm.signal_group(signal.SIGSTOP)
        stopped = True
        # Held until labelstream has seen the hang (an attempt timed out and was retried): bounded by --timeout.
        wait_for(lambda: progress(out).get("retries", 0) >= 1, timeout=120, what="a timed-out attempt")
        vllm.signal_group(signal.SIGCONT)
        stopped = False
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if stopped:
            vllm.signal_group(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    ids = sink_ids(out)
    assert len(ids) == rows == len(set(ids))


def test_length_reply_retried_at_most_once(logs: Path, tmp_path: Path) -> None:
    """vLLM's default grammar lets a weak model pad whitespace to max_tokens: one retry at most, not six per row."""
    rows = 6
    inp = sample_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    with VLLM(logs / "vllm-whitespace.log", whitespace=True) as padded:
        done = label_cli(padded.base_url, inp, out, "--concurrency", "2")
        sent = padded.chat_requests()
    assert done.returncode in {1, 2}, done.stdout + done.stderr
    assert sent <= 2 * rows, f"{sent} requests for {rows} rows whose every reply is cut at max_tokens"
    letters = dead_letters(out)
    assert all(letter["attempts"] <= 2 for letter in letters), letters
    # Failed attempts' tokens were processed by the server and are counted.
    assert "0 prompt + 0 completion" not in done.stdout + done.stderr
