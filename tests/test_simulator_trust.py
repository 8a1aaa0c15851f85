"""The simulator's plausible side: labels scored against the task, logprobs, prompt caching, reasoning tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.simulator import SimulatorThread
from pipeline.simulator.judge import Judge
from pipeline.task.config import load_config
from pipeline.task.prompt import Prompt

from .helpers import ROOT, cli
from .test_simulator import COMPLETION, call, check

SENTIMENT = load_config(ROOT / "configs" / "sentiment.toml")
PROMPT = Prompt(SENTIMENT)


def ask(sim: SimulatorThread, text: str, *, prompt: Prompt = PROMPT, **extra: Any) -> tuple[int, dict[str, Any]]:
    """POST the request labelstream sends for `text` (plus `extra` fields): status and parsed body."""
    body = {"model": "gpt-4o-mini", "messages": prompt.messages(text), "response_format": prompt.response_format}
    status, _, raw = call(sim, "POST", "/v1/chat/completions", {**body, **extra})
    return status, json.loads(raw)


def label_in(body: dict[str, Any]) -> str:
    return str(json.loads(body["choices"][0]["message"]["content"])["label"])


def test_the_judge_picks_the_label_whose_description_and_examples_match() -> None:
    """Texts sharing words with one label's description or examples score highest for that label."""
    judge = Judge()
    for text, expected in [
        ("Stopped working after a week, I want a refund", "negative"),
        ("정말 만족해요, 친구에게 추천해요", "positive"),
        ("When will it arrive? 언제 오나요", "neutral"),
    ]:
        scores = judge.scores(PROMPT.messages(text))
        assert scores is not None
        assert max(scores, key=scores.__getitem__) == expected, (text, scores)
    assert Judge().scores([{"role": "system", "content": "Label it."}, {"role": "user", "content": "x"}]) is None


def test_labels_of_the_bundled_sample_are_mostly_right(sim: SimulatorThread, tmp_path: Path) -> None:
    """Over HTTP, the sample's sentiment labels agree with its gold column for at least 80% of rows."""
    out = tmp_path / "sample.jsonl"
    sample = ROOT / "configs" / "sample_reviews.csv"
    labeled = cli("label", "--input", str(sample), "--output", str(out), "--base-url", sim.base_url, "--quiet")
    assert labeled.returncode == 0, labeled.stderr
    scored = cli("eval", str(out), "--gold", str(sample), "--gold-column", "gold", "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["gold_rows"] == result["labeled"] == 300
    assert 0.8 <= result["accuracy"] < 1.0  # plausible, not perfect: a similarity rule has blind spots


def test_logprobs_reply_validates_and_carries_the_labels_probability(sim: SimulatorThread) -> None:
    """With logprobs and top_logprobs the reply validates against the API description; the label's first token
    carries the chosen label's probability and its rivals appear among at most top_logprobs alternatives."""
    status, body = ask(sim, "The app crashes and support never answers", logprobs=True, top_logprobs=2)
    assert status == 200
    check(body, COMPLETION)
    tokens = body["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == body["choices"][0]["message"]["content"]
    assert all(bytes(t["bytes"]).decode() == t["token"] for t in tokens)
    assert all(len(t["top_logprobs"]) <= 2 for t in tokens)
    chosen = next(t for t in tokens if t["token"] == label_in(body))
    assert -2.0 < chosen["logprob"] < 0
    assert chosen["top_logprobs"][0]["token"] == label_in(body)  # the likeliest alternative is the one taken
    plain = ask(sim, "The app crashes and support never answers")[1]
    assert plain["choices"][0]["logprobs"] is None
    check(plain, COMPLETION)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
     ({"logprobs": "yes"}, "logprobs")],
    ids=["top_without_logprobs", "top_over_20", "logprobs_not_bool"],
)  # fmt: skip
def test_bad_logprobs_parameters_get_the_apis_400(sim: SimulatorThread, extra: dict[str, Any], param: str) -> None:
    """top_logprobs without logprobs, outside 0..20, or a non-boolean logprobs is refused naming the parameter."""
    status, body = ask(sim, "fine", **extra)
    assert status == 400
    assert body["error"]["param"] == param
    check(body, "/components/schemas/ErrorResponse")


def test_logprobs_can_be_ignored_or_refused_like_other_endpoints(sim: SimulatorThread) -> None:
    """logprobs="ignore" answers without them (null); "reject" answers 400 unsupported_parameter, as reasoning
    models do, while requests without logprobs still succeed."""
    sim.configure(logprobs="ignore")
    status, body = ask(sim, "fine", logprobs=True, top_logprobs=3)
    assert status == 200 and body["choices"][0]["logprobs"] is None
    check(body, COMPLETION)
    sim.configure(logprobs="reject")
    status, body = ask(sim, "fine", logprobs=True)
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "unsupported_parameter", "logprobs")
    assert ask(sim, "fine")[0] == 200


def long_prompt(tokens: int) -> Prompt:
    """The sentiment task with instructions padded to about `tokens` tokens (the simulator counts chars/4)."""
    padding = " ".join(f"Rule {i}: judge the whole text, not one word." for i in range(tokens // 11))
    return Prompt(SENTIMENT.with_overrides(instructions=SENTIMENT.instructions + "\n" + padding))


def test_a_repeated_long_prefix_is_served_from_the_prompt_cache(sim: SimulatorThread) -> None:
    """A prefix of 1,024+ tokens is cached from its second use on, in steps of 128; a short or a different
    prefix is not; cached tokens never exceed the prompt."""
    long = long_prompt(1400)
    first = ask(sim, "first text", prompt=long)[1]["usage"]
    second = ask(sim, "another text", prompt=long)[1]["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 1024 and cached % 128 == 0 and cached <= second["prompt_tokens"]
    assert ask(sim, "a third", prompt=long_prompt(1500))[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for text in ("short one", "short two"):
        assert ask(sim, text)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_padded_reply_fills_max_tokens_with_whitespace_and_validates(sim: SimulatorThread) -> None:
    """length_rate picks rows by their text: each request for a picked row is "{" and whitespace until
    max_completion_tokens, finish_reason "length", usage at the full budget, valid against the API description,
    its logprobs spelling the content; a row not picked is answered normally."""
    sim.configure(length_rate=0.5)
    texts = [f"review {i}: fine" for i in range(12)]
    picked = [t for t in texts if ask(sim, t, max_completion_tokens=64)[1]["choices"][0]["finish_reason"] == "length"]
    assert 0 < len(picked) < len(texts)
    for text in picked[:2]:
        body = ask(sim, text, max_completion_tokens=64, logprobs=True, top_logprobs=2)[1]
        check(body, COMPLETION)
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length" and choice["message"]["content"].strip() == "{"
        assert body["usage"]["completion_tokens"] == 64
        assert "".join(t["token"] for t in choice["logprobs"]["content"]) == choice["message"]["content"]
        assert ask(sim, text, max_completion_tokens=128)[1]["usage"]["completion_tokens"] == 128, "same row, again"
    normal = next(t for t in texts if t not in picked)
    assert ask(sim, normal, max_completion_tokens=64)[1]["choices"][0]["finish_reason"] == "stop"


def test_reasoning_tokens_are_billed_within_the_completion_budget(sim: SimulatorThread) -> None:
    """reasoning_tokens adds to completion_tokens (reported in its details) up to max_completion_tokens."""
    sim.configure(reasoning_tokens=10)
    body = ask(sim, "fine", max_completion_tokens=64)[1]
    usage = body["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 10
    assert usage["completion_tokens"] == 10 + -(-len(body["choices"][0]["message"]["content"]) // 4)
    check(body, COMPLETION)
    capped = ask(sim, "fine", max_completion_tokens=8)[1]["usage"]
    assert capped["completion_tokens"] <= 8


def test_a_vllm_flavoured_reply_validates_and_ends_its_logprobs_with_the_stop_token(sim: SimulatorThread) -> None:
    """server="vllm" lists the stop token after the tokens that spell the text, and pad_whitespace pads the JSON
    with newlines kept in the text and the tokens; the reply still validates against the API description."""
    sim.configure(server="vllm", pad_whitespace=3)
    status, body = ask(sim, "The app crashes and support never answers", logprobs=True, top_logprobs=2)
    assert status == 200
    check(body, COMPLETION)
    content = body["choices"][0]["message"]["content"]
    tokens = body["choices"][0]["logprobs"]["content"]
    assert content.endswith("\n\n\n}") and json.loads(content)["label"]
    assert bytes(tokens[-1]["bytes"]) == tokens[-1]["token"].encode() == b"</s>"
    assert "".join(t["token"] for t in tokens[:-1]) == content
