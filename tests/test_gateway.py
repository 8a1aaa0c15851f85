"""Tail tolerance and provider quirks: adaptive timeouts, and a LiteLLM-shaped gateway in front of the simulator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.api.errors import Meaning, classify
from pipeline.api.failures import gateway_of
from pipeline.api.timeouts import FLOOR, AdaptiveTimeout
from pipeline.errors import FatalApiError
from pipeline.ratelimit.headers import retry_after_seconds
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy

from .helpers import ROOT, cli, dead_letters, ids_once, label, reviews, sink_ids, write_csv

QUICK = RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=60.0)


@pytest.mark.wallclock
def test_a_hung_request_costs_a_few_latencies_not_the_full_timeout(sim: Any, tmp_path: Path) -> None:
    """With --timeout 60, a request that hangs late in a run is abandoned after the adaptive timeout (seconds)."""
    sim.configure(latency_ms=50)
    sim.script([{"kind": "hang", "match": "review 250:", "count": 1}])
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(300)), out, concurrency=8, retry=QUICK)
    elapsed = time.monotonic() - started
    assert summary.exit_code == 0 and len(ids_once(out)) == 300
    assert summary.retries + summary.hedged == 1  # cut by the adaptive timeout, or hedged near the end of the input
    assert elapsed < 20, f"the hung request held the run for {elapsed:.0f} s"


def test_the_adaptive_timeout_follows_the_observed_latencies() -> None:
    """Until 32 replies the ceiling rules; then 4 × p99, never under the floor nor over the ceiling."""
    timeouts = AdaptiveTimeout(60.0)
    for i in range(31):
        timeouts.note_reply(0.05, float(i))
    assert timeouts.seconds == 60.0
    timeouts.note_reply(0.05, 31.0)
    assert timeouts.seconds == FLOOR
    slow = AdaptiveTimeout(60.0)
    for i in range(64):
        slow.note_reply(10.0 + i / 100, float(i))
    assert slow.seconds == pytest.approx(4 * 10.63), "a slow model's replies are far inside its timeout"
    medium = AdaptiveTimeout(60.0)
    for i in range(64):
        medium.note_reply(3.0, float(i))
    assert medium.seconds == pytest.approx(12.0)


def test_timeouts_in_a_cluster_read_as_overload_and_a_lone_one_does_not() -> None:
    """Three timeouts among few replies within one timeout's span are overload; one among many is bad luck."""
    timeouts = AdaptiveTimeout(60.0)
    for i in range(100):
        timeouts.note_reply(0.05, 10 + i / 100)
    assert not timeouts.note_timeout(11.0)
    assert not timeouts.note_timeout(11.1)
    assert not timeouts.note_timeout(11.2), "3 timeouts against 100 replies in the span: bad luck"
    quiet = AdaptiveTimeout(60.0)
    for i in range(40):
        quiet.note_reply(0.05, i / 10)
    assert not quiet.note_timeout(10.0)
    assert not quiet.note_timeout(10.5)
    assert quiet.note_timeout(11.0), "3 timeouts and no replies within the span: overload"


def test_gateway_prefixed_retry_headers_are_read() -> None:
    """llm_provider-retry-after(-ms) and Azure's x-ms-retry-after-ms feed the same pause as the plain names."""
    assert retry_after_seconds({"llm_provider-retry-after": "7"}) == 7.0
    assert retry_after_seconds({"llm_provider-retry-after-ms": "250", "llm_provider-retry-after": "9"}) == 0.25
    assert retry_after_seconds({"x-ms-retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"llm_provider-x-ratelimit-reset-requests": "2s"}) == 2.0
    assert retry_after_seconds({"retry-after": "3", "llm_provider-retry-after": "9"}) == 3.0


@pytest.mark.parametrize(
    ("status", "body", "meaning", "shown"),
    [
        (429, {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                         "type": "throttling_error", "code": "429"}}, Meaning.QUOTA,
         "HTTP 429 throttling_error: You exceeded"),
        (400, {"error": {"message": "Invalid model name passed in model=gpt-40", "type": "invalid_request_error",
                         "code": "400"}}, Meaning.MODEL, "HTTP 400 invalid_request_error: Invalid"),
        (400, {"error": {"message": "Authentication Error, No connected db.", "type": "no_db_connection",
                         "code": "400"}}, Meaning.KEY, "HTTP 400 no_db_connection: Authentication"),
        (429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}, Meaning.RATE_LIMIT,
         "HTTP 429 rate_limit_exceeded: Rate limit reached"),
        (400, {"error": {"message": "Invalid 'messages'", "code": "invalid_type"}}, Meaning.BAD_REQUEST,
         "HTTP 400 invalid_type:"),
    ],
)  # fmt: skip
def test_error_replies_are_read_by_their_meaning(status: int, body: Any, meaning: Meaning, shown: str) -> None:
    """Quota, unknown model and bad key are recognised from the message when the code does not say; the status
    is shown once even when a gateway repeats it as the code."""
    error = classify(status, body, "fallback")
    assert error.meaning is meaning
    assert error.describe().startswith(shown)
    assert f"{status} {status}" not in error.describe()


@pytest.mark.wallclock
def test_litellm_renamed_retry_after_is_honoured(sim: Any, tmp_path: Path) -> None:
    """Behind the gateway a 429's only wait is llm_provider-retry-after (2.5 s): the next request waits for it."""
    sim.configure(gateway="litellm")
    sim.script([{"kind": "status", "status": 429, "retry_after": 2.5, "count": 1}])
    label(sim, write_csv(tmp_path / "in.csv", reviews(2)), tmp_path / "out.jsonl", concurrency=1, retry=QUICK)
    times = [t for t, _, _ in sim.stats()["events"]]
    assert times[1] - times[0] >= 2.5


def test_litellm_quota_exhaustion_stops_at_once(sim: Any, tmp_path: Path) -> None:
    """An upstream insufficient_quota that the gateway passes on as throttling_error "429" stops the run."""
    sim.configure(gateway="litellm")
    message = "You exceeded your current quota, please check your plan and billing details."
    sim.script([{"kind": "status", "status": 429, "code": "insufficient_quota", "message": message, "count": -1}])
    with pytest.raises(FatalApiError, match="out of quota") as caught:
        label(sim, write_csv(tmp_path / "in.csv", reviews(100)), tmp_path / "out.jsonl", concurrency=4, retry=QUICK)
    assert "HTTP 429 throttling_error: You exceeded your current quota" in caught.value.message
    assert "litellm.RateLimitError" not in caught.value.message, "the gateway's exception prefixes are dropped"
    assert sim.stats()["requests"] <= 8


def test_a_fatal_message_is_printed_once_and_cut_at_a_word(sim: Any, tmp_path: Path) -> None:
    """A long gateway error that stops the run is printed once (the `error:` line, no "stopped because" copy),
    without the gateway's exception prefixes, and cut after a whole word."""
    sim.configure(gateway="litellm")
    message = "You exceeded your current quota, please check your plan and billing details. " * 6
    sim.script([{"kind": "status", "status": 429, "code": "insufficient_quota", "message": message, "count": -1}])
    source = write_csv(tmp_path / "in.csv", reviews(20))
    out = tmp_path / "out.jsonl"
    result = cli("label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("out of quota") == 1, result.stderr
    assert "stopped because" not in result.stderr and "RateLimitError" not in result.stderr
    shown = result.stderr.split("throttling_error: ")[1].split("). Add credit")[0]
    assert shown.endswith("…") and message.startswith(shown[:-1]) and message[len(shown) - 1] == " "


@pytest.mark.parametrize("what", ["model", "key"])
def test_litellm_400s_for_a_bad_model_or_key_stop_after_the_first_replies(sim: Any, tmp_path: Path, what: str) -> None:
    """Unknown model and bad key come back as 400s from the gateway: the run stops with advice on the right thing."""
    if what == "model":
        sim.configure(gateway="litellm", models=["gpt-4o-mini"])
        config_model = {"model": "gpt-4o-minii"}
        advice = "does not serve model 'gpt-4o-minii'"
    else:
        sim.configure(gateway="litellm", api_key="sk-the-right-key-000000000000")
        config_model = {}
        advice = "rejected the API key"
    source = write_csv(tmp_path / "in.csv", reviews(100))
    out = tmp_path / "out.jsonl"
    args = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress",
            "--concurrency", "4", *(["--model", config_model["model"]] if config_model else [])]  # fmt: skip
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert advice in result.stderr
    assert "request format" not in result.stderr and "response_format" not in result.stderr
    assert sim.stats()["requests"] <= 8


def test_a_mistyped_model_neither_fixes_the_sink_nor_returns_in_the_resume_command(sim: Any, tmp_path: Path) -> None:
    """After a run stopped by an unknown model, the printed resume command asks for a model instead of repeating the
    bad one, and the right model is accepted by the resume guard (no row was labeled with the wrong one)."""
    sim.configure(models=["gpt-4o-mini"])
    source = write_csv(tmp_path / "in.csv", reviews(20))
    out = tmp_path / "out.jsonl"
    base = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress"]
    wrong = cli(*base, "--model", "gpt-4o-minii")
    assert wrong.returncode == 2
    assert "resume with:" in wrong.stderr and "--model MODEL" in wrong.stderr
    assert "--model gpt-4o-minii" not in wrong.stderr.split("resume with:")[1]
    right = cli(*base, "--model", "gpt-4o-mini")
    assert right.returncode == 0, right.stderr
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(20))


@pytest.mark.wallclock
def test_requests_held_by_a_gateway_past_the_timeout_count_as_rate_limiting(sim: Any, tmp_path: Path) -> None:
    """A gateway that holds over-limit requests past --timeout: the timeouts slow the run like 429s instead of
    using up rows' retries, and every row ends labeled; the summary calls them timeouts (no 429 came), counts the
    abandoned attempts' worst case into the cost as an upper bound, and tells LiteLLM users what to set."""
    sim.configure(gateway="litellm", hold_seconds=30, rpm=600, window_seconds=6, latency_ms=20)
    retry = RetryPolicy(max_attempts=3, base_wait=0.001, max_wait=0.01, timeout=1.5)
    out = tmp_path / "out.jsonl"
    # 80 rows: 60 fit the first 6 s window, so 20 are held and time out, retried until the next window admits them
    # (with held timeouts treated as plain ones, 69 of the 80 ended as dead letters: checked).
    summary = label(
        sim, write_csv(tmp_path / "in.csv", reviews(80)), out, limits=LimitSettings(concurrency=40), retry=retry
    )
    assert dead_letters(out) == []
    assert summary.exit_code == 0 and len(ids_once(out)) == 80
    assert summary.rate_limited == 0 and summary.held > 0 and summary.timeouts >= summary.held
    text = summary.render()
    assert f"(0 after 429, {summary.timeouts} after timeouts)" in text
    assert f"{summary.abandoned:,} attempts abandoned without a reply (may still be billed" in text
    assert summary.abandoned >= summary.timeouts
    assert "the gateway is holding requests" in text and "`num_retries: 0`" in text
    assert summary.abandoned_cost_usd and summary.cost_usd and summary.cost_usd > summary.abandoned_cost_usd > 0


@pytest.mark.wallclock
def test_a_server_slower_than_the_timeout_stops_the_run_with_what_to_do(sim: Any, tmp_path: Path) -> None:
    """Replies that always take longer than --timeout are not an overload to wait out: with nothing ever back,
    the run stops after 20 timed-out attempts and says to raise --timeout (it used to retry forever)."""
    sim.configure(latency_ms=1500)
    impatient = RetryPolicy(max_attempts=4, base_wait=0.001, max_wait=0.01, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(FatalApiError, match=r"no reply within 0\.3 s.*raise --timeout") as caught:
        label(sim, write_csv(tmp_path / "in.csv", reviews(60)), tmp_path / "out.jsonl", concurrency=8, retry=impatient)
    assert caught.value.cause == "timeout"
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("recorded", ["litellm_reply", "litellm_error_rate_limit", "litellm_error_bad_model"])
def test_litellm_is_recognised_from_the_headers_it_really_sends(recorded: str) -> None:
    """The headers LiteLLM 1.108.7 sent (recorded by the compat tier) name the gateway on a reply and on errors
    alike (errors carry a call id but no version); an OpenAI-shaped reply's headers name none."""
    headers = orjson.loads((ROOT / "tests" / "data" / "compat" / f"{recorded}.json").read_bytes())["headers"]
    assert gateway_of(headers) == "litellm"
    assert gateway_of({"content-type": "application/json", "x-request-id": "req_1"}) is None
