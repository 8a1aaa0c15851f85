"""Deterministic failures read as such: a cut-off reply gets one roomier retry, a streak of one kind stops the
run, and every attempt's tokens, usable or not, are counted and priced."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.failures import STREAK_BREAKER, FailureWatch, roomier
from pipeline.api.pricing import load_prices
from pipeline.errors import FatalApiError, clip
from pipeline.ratelimit.limiter import RetryPolicy
from pipeline.results import Failed, Labeled, Row
from pipeline.run.budget import Budget
from pipeline.run.progress import Reporter
from pipeline.sinks import open_sink
from pipeline.stats import CallStats, RunStats
from pipeline.task.prompt import ReplyError

from .helpers import SENTIMENT, cli, dead_letters, label, progress, reviews, write_csv

RETRY = RetryPolicy(max_attempts=6, base_wait=0.001, max_wait=0.01, timeout=10.0)
MAX_TOKENS = SENTIMENT.max_tokens


def test_a_reply_cut_off_at_max_tokens_is_retried_once_with_twice_the_room(sim: Any, tmp_path: Path) -> None:
    """A row whose replies pad whitespace until max_tokens costs two attempts (max_tokens, then twice that), not
    --max-retries, and its dead letter says to raise max_tokens; a row cut off once is labeled by that retry."""
    sim.script([{"kind": "pad", "count": -1, "match": "review 2:"}, {"kind": "pad", "count": 1, "match": "review 4:"}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(5)), out, retry=RETRY)
    [letter] = dead_letters(out)
    assert (letter["id"], letter["kind"], letter["attempts"]) == ("r00002", "length", 2)
    assert "Raise max_tokens in the task file" in letter["message"]
    assert summary.labeled == 4
    records = {r["id"]: r for r in open_sink(out).iter_records()}
    assert records["r00004"]["attempts"] == 2
    labeled = sum(r["completion_tokens"] for r in records.values())
    padded = sim.stats()["completion_tokens"] - labeled
    assert padded == 2 * MAX_TOKENS + roomier(MAX_TOKENS), "each first try had max_tokens, the retry twice that"


def test_every_reply_padded_stops_the_run_with_one_message(sim: Any, tmp_path: Path) -> None:
    """A model that pads every reply (vLLM's default structured output): the run stops after 20 cut-off replies in a
    row with no success, exit 2, saying what to change; not 6 identical requests for every row of the input. The rows
    cut off twice before the stop are no dead letters nor failed rows: the stop names the one cause."""
    sim.configure(length_rate=1.0)
    source = write_csv(tmp_path / "in.csv", reviews(300))
    out = tmp_path / "out.jsonl"
    result = cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress",
                 "--concurrency", "8")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"the first {STREAK_BREAKER} replies were all unusable the same way (length" in result.stderr
    assert "Raise max_tokens" in result.stderr and "disable_any_whitespace" in result.stderr
    assert result.stderr.count("were all unusable") == 1, "the message is printed once"
    assert "stopped because" not in result.stderr
    served = sim.stats()
    assert served["requests"] <= STREAK_BREAKER + 8
    assert dead_letters(out) == [], "no row is blamed for an endpoint-wide problem"
    summary = progress(out)["summary"]
    assert (summary["failed"], summary["failures"]) == (0, {})
    assert summary["unusable_replies"] >= STREAK_BREAKER and summary["completion_tokens"] >= STREAK_BREAKER * MAX_TOKENS
    price = load_prices().price_of("gpt-4o-mini")
    assert price is not None
    billed = price.cost(served["prompt_tokens"], served["completion_tokens"])
    assert summary["cost_usd"] >= round(billed, 6), "requests cut off by the stop are in the cost as an upper bound"


def test_rows_held_back_during_a_streak_are_dead_letters_when_the_run_goes_on() -> None:
    """A row that failed like every reply before it is held back; a later success or the end of a run that no streak
    stopped makes it a dead letter after all; a streak stop drops only the rows of the stopping kind."""
    stats = CallStats()
    watch = FailureWatch(stats, endpoints=1)
    row = Row("r1", "text", 2)
    cut = Failed(row, "length", "cut off", 2, None, "t")
    odd = Failed(row, "invalid_label", "no such label", 6, None, "t")
    timeout = Failed(row, "timeout", "no reply", 6, None, "t")
    assert watch.sift(cut) == [] and watch.sift(timeout) == [timeout], "only deterministic kinds wait"
    stats.successes = 1
    done = Labeled(row, "positive", "m", 1, 1, 1.0, 1, "t")
    assert watch.sift(done) == [cut, done] and watch.settle() == []
    stats.successes = 0
    assert watch.sift(cut) == [] and watch.sift(odd) == []
    with pytest.raises(FatalApiError):
        for _ in range(STREAK_BREAKER):
            watch.unusable(ReplyError("length", "cut off"), b"{}", "application/json", "http://x/v1")
    assert watch.settle() == [odd]


@pytest.mark.parametrize(("kind", "advice"), [("label_outside", "labels outside"), ("bad_json_content", "JSON")])
def test_a_streak_of_any_deterministic_kind_stops_the_run(sim: Any, tmp_path: Path, kind: str, advice: str) -> None:
    """Labels outside the set or replies that are no JSON, 20 in a row before any success, stop the run too."""
    sim.script([{"kind": kind, "count": -1}])
    with pytest.raises(FatalApiError, match=advice) as caught:
        label(sim, write_csv(tmp_path / "in.csv", reviews(200)), tmp_path / "out.jsonl", retry=RETRY)
    assert caught.value.cause == "reply"
    assert sim.stats()["requests"] <= STREAK_BREAKER + 8


def test_unusable_replies_are_counted_and_priced(sim: Any, tmp_path: Path) -> None:
    """The tokens of replies that failed validation are in the summary's totals and cost (the server billed
    them): the run's token counts equal the simulator's."""
    sim.script([{"kind": "label_outside", "count": 5}, {"kind": "pad", "count": 3}])
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(20)), tmp_path / "out.jsonl", retry=RETRY)
    served = sim.stats()
    assert summary.exit_code == 0
    assert (summary.prompt_tokens, summary.completion_tokens) == (served["prompt_tokens"], served["completion_tokens"])
    assert summary.unusable_replies == 8
    price = load_prices().price_of("gpt-4o-mini")
    assert price is not None
    assert summary.cost_usd == pytest.approx(price.cost(served["prompt_tokens"], served["completion_tokens"]))
    assert "8 unusable replies" in summary.render()


def test_the_budget_counts_unusable_replies_and_abandoned_attempts() -> None:
    """--max-cost spending is read from the client's counters: unusable replies' usage and the worst case of
    abandoned attempts count as spent."""
    price = load_prices().price_of("gpt-4o-mini")
    assert price is not None
    calls = CallStats(prompt_tokens=1000, completion_tokens=200)
    budget = Budget(1.0, price, len, 20, calls)
    assert budget.spent == pytest.approx(price.cost(1000, 200))
    calls.abandoned_prompt_tokens, calls.abandoned_completion_tokens = 500, 20
    assert budget.spent == pytest.approx(price.cost(1500, 220))


def test_timeouts_are_shown_as_timeouts_not_429s() -> None:
    """Progress and summary keep 429s and timeouts apart: "2×429 | 7 timeouts", "retries: 9 (2 after 429, 7 after
    timeouts)"; the progress file has both counters."""
    stats = RunStats(calls=CallStats(retries=9, rate_limited=2, timeouts=7), model="gpt-4o-mini", expected=10)
    stats.labeled = 1
    stream = io.StringIO()
    Reporter(stats, stream=stream, log_every=0).update()
    assert "2×429 | 7 timeouts" in stream.getvalue()
    snapshot = stats.snapshot("running")
    assert (snapshot["rate_limited"], snapshot["timeouts"]) == (2, 7)


def test_a_message_is_cut_at_a_word_boundary() -> None:
    """Long messages end on a whole word with an ellipsis, never mid-word."""
    text = "You exceeded your current quota, please check your plan and billing details. " * 3
    cut = clip(text, 60)
    assert len(cut) <= 60 and cut.endswith("…")
    assert text.startswith(cut[:-1]) and text[len(cut) - 1] == " "
    assert clip("short", 60) == "short"


def test_a_prompt_too_long_for_the_context_gets_advice_and_no_rerun_hint(sim: Any, tmp_path: Path) -> None:
    """A 400 that says the prompt exceeds the context (vLLM's wording) is dead-lettered as `context_length` after one
    attempt, with what to change in the summary, and the summary does not offer a re-run that would fail again."""
    message = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains at least 2049 input "
        "tokens, which exceeds this limit even without any output tokens."
    )
    sim.script([{"kind": "status", "status": 400, "message": message, "count": -1, "match": "review 2:"}])
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(4)), out, retry=RETRY)
    [letter] = dead_letters(out)
    assert (letter["kind"], letter["attempts"]) == ("context_length", 1)
    text = summary.render()
    assert "max_chars in the task file" in text
    assert "to retry the" not in text
