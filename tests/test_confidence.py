"""Confidence from logprobs: how it is computed, stored per row, missing without failing, and --review-below."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from pipeline.api.confidence import label_confidence
from pipeline.api.request import read_reply
from pipeline.run.summary import Summary
from pipeline.sinks import open_sink
from pipeline.task.prompt import Prompt

from .helpers import ROOT, SENTIMENT, cli, dead_letters, label, label_batch, reviews, sink_ids, write_csv
from .test_cli import label_args

LABELS = ("positive", "negative", "neutral")


def summary_of() -> Summary:
    """A summary of a small done run, to render."""
    return Summary("done", "in.csv", "out.jsonl", "dl.jsonl", 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1.0, 10, 2, None, "m", "")


def tok(token: str, logprob: float, *alternatives: tuple[str, float]) -> dict[str, Any]:
    """One `logprobs.content` entry."""
    alts = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alts}


def test_confidence_is_the_probability_of_the_labels_tokens() -> None:
    """The label's tokens' probabilities multiply; tokens around it (keys, quotes) do not count."""
    tokens = [tok('{"', -0.5), tok("label", 0), tok('":"', 0), tok("neg", math.log(0.8)), tok("ative", math.log(0.9)),
              tok('"}', -0.3)]  # fmt: skip
    assert label_confidence('{"label":"negative"}', tokens, "negative", "label", LABELS) == pytest.approx(0.72)


def test_rivals_in_top_logprobs_renormalise_over_the_labels() -> None:
    """Mass on tokens that would begin another label joins the denominator; tokens beginning no label do not."""
    first = tok('"pos', math.log(0.6), ('"pos', math.log(0.6)), ('"neg', math.log(0.2)), ("{", math.log(0.1)))
    tokens = [tok('{"label":', 0), first, tok('itive"}', 0)]
    assert label_confidence('{"label":"positive"}', tokens, "positive", "label", LABELS) == pytest.approx(0.75)


def test_tokens_that_split_a_character_are_aligned_by_their_bytes() -> None:
    """When a token ends inside a multi-byte character (its string is a stand-in), its bytes place it."""
    word = "긍정".encode()
    split = [
        tok('{"label":"', 0),
        {"token": "\ufffd", "logprob": math.log(0.7), "bytes": list(word[:2]), "top_logprobs": []},
        {"token": "\ufffd정", "logprob": math.log(0.9), "bytes": list(word[2:]), "top_logprobs": []},
        tok('"}', 0),
    ]
    got = label_confidence('{"label":"긍정"}', split, "긍정", "label", ["긍정", "부정"])
    assert got == pytest.approx(0.63)


def test_multi_label_confidence_is_the_least_sure_label() -> None:
    """For several labels, the confidence is the lowest of theirs."""
    content = '{"labels":["billing","shipping"]}'
    tokens = [tok('{"labels":["', 0), tok("billing", math.log(0.9)), tok('","', 0), tok("shipping", math.log(0.6)),
              tok('"]}', 0)]  # fmt: skip
    got = label_confidence(content, tokens, ["billing", "shipping"], "labels", ["billing", "shipping", "other"])
    assert got == pytest.approx(0.6)


@pytest.mark.parametrize("tokens", [None, [], [tok("something else", -0.1)]], ids=["none", "empty", "other_text"])
def test_no_or_mismatched_logprobs_give_no_confidence(tokens: Any) -> None:
    """Without logprobs, or with tokens that do not spell the reply, the confidence is unknown (None)."""
    assert label_confidence('{"label":"neutral"}', tokens, "neutral", "label", LABELS) is None


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_every_labeled_row_stores_its_confidence(sim: Any, tmp_path: Path, name: str) -> None:
    """Over HTTP, each record carries a confidence in (0, 1]; Parquet stores it as a float column."""
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / name
    summary = label(sim, source, out)
    assert summary.labeled == 30
    records = list(open_sink(out).iter_records())
    assert all(0 < r["confidence"] <= 1 for r in records)
    if name.endswith(".parquet"):
        assert str(ds.dataset(out).schema.field("confidence").type) == "float"


@pytest.mark.parametrize("mode", ["ignore", "reject"])
def test_endpoints_without_logprobs_leave_confidence_empty_and_never_fail(sim: Any, tmp_path: Path, mode: str) -> None:
    """An endpoint that ignores logprobs, or refuses them with a 400 (reasoning models), labels every row with an
    empty confidence: no dead letter, and after a refusal the run stops asking."""
    sim.configure(logprobs=mode)
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.jsonl"
    summary = label(sim, source, out, concurrency=4)
    assert (summary.labeled, summary.failed) == (40, 0)
    assert dead_letters(out) == []
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["confidence"] for r in records] == [None] * 40
    refused = sim.stats()["by_status"].get("400", 0)
    assert refused <= (4 if mode == "reject" else 0)  # only requests sent before the first refusal came back


def test_review_below_writes_the_least_sure_rows_with_their_input(sim: Any, tmp_path: Path) -> None:
    """--review-below P writes OUT.review.csv beside the sink: exactly the rows under P, with their input columns,
    label, confidence and an empty review_label; filled in, it works as a gold file for eval."""
    sample = ROOT / "configs" / "sample_reviews.csv"
    out = tmp_path / "out.jsonl"
    result = cli(*label_args(sim, sample, out, "--review-below", "0.8"))
    assert result.returncode == 0, result.stderr
    review = tmp_path / "out.review.csv"
    assert f"rows with confidence under 0.8 → {review}" in result.stderr
    with review.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    records = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert {r["id"] for r in rows} == {i for i, r in records.items() if r["confidence"] < 0.8}
    assert 0 < len(rows) < len(records)
    assert list(rows[0]) == ["id", "lang", "text", "gold", "label", "confidence", "review_label"]
    assert all(r["label"] == records[r["id"]]["label"] and r["review_label"] == "" for r in rows)

    for row in rows:
        row["review_label"] = row["gold"]
    with review.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scored = cli("eval", str(out), "--gold", str(review), "--gold-column", "review_label", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["gold_rows"] == len(rows)


def test_review_file_covers_earlier_runs_without_repeats(sim: Any, tmp_path: Path) -> None:
    """Written from the whole sink at the end of each run, the review file lists every doubtful row once."""
    sample = ROOT / "configs" / "sample_reviews.csv"
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, sample, out, "--review-below", "0.9", "--limit", "150")).returncode == 0
    assert cli(*label_args(sim, sample, out, "--review-below", "0.9")).returncode == 0
    with (tmp_path / "out.review.csv").open(newline="", encoding="utf-8") as handle:
        ids = [r["id"] for r in csv.DictReader(handle)]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in records if r["confidence"] < 0.9)
    assert len(ids) == len(set(ids))
    assert len(sink_ids(out)) == 300


LABEL_TOKENS = [tok('{"', 0), tok("label", 0), tok('":"', 0), tok("neg", math.log(0.8)), tok("ative", math.log(0.9)),
                tok('"}', 0)]  # fmt: skip


@pytest.mark.parametrize("stop", ["</s>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"])
def test_a_stop_token_after_the_content_is_not_part_of_it(stop: str) -> None:
    """vLLM ends logprobs.content with the stop token the text leaves out: the label's confidence is read anyway."""
    tokens = [*LABEL_TOKENS, tok(stop, -0.01)]
    assert label_confidence('{"label":"negative"}', tokens, "negative", "label", LABELS) == pytest.approx(0.72)


def test_whitespace_padding_outside_the_text_is_skipped() -> None:
    """Whitespace tokens around the JSON that the text lacks (trimmed by a server or gateway), even one that
    straddles the JSON's last brace, do not hide the label; padding inside the text is part of it."""
    tokens = [tok("\n", 0), *LABEL_TOKENS[:-1], tok('"}\n\n', 0), tok("</s>", 0)]
    assert label_confidence('{"label":"negative"}', tokens, "negative", "label", LABELS) == pytest.approx(0.72)
    inside = [*LABEL_TOKENS[:-1], tok('"', 0), tok("\n\n", -0.2), tok("}", 0), tok("<|im_end|>", 0)]
    assert label_confidence('{"label":"negative"\n\n}', inside, "negative", "label", LABELS) == pytest.approx(0.72)


@pytest.mark.parametrize(
    "extra", [[tok(" Hope this helps", -0.1)], [tok("x", 0), tok("</s>", 0)]], ids=["text_after", "text_then_stop"]
)
def test_tokens_beyond_the_text_that_are_not_padding_give_no_confidence(extra: list[dict[str, Any]]) -> None:
    """Tokens after the text that are neither whitespace nor a special token mean the tokens spell another text."""
    assert label_confidence('{"label":"negative"}', [*LABEL_TOKENS, *extra], "negative", "label", LABELS) is None


def test_logprobs_that_came_but_do_not_spell_the_reply_are_flagged() -> None:
    """A reply whose logprobs do not spell its text is labeled without confidence and flagged as such; a reply
    without logprobs is not flagged (that is the endpoint's choice, not a misreading)."""
    prompt = Prompt(SENTIMENT)
    body = {"model": "m", "choices": [{"message": {"content": '{"label":"negative"}'}, "finish_reason": "stop"}]}
    assert read_reply(prompt, body).logprobs_unread is False
    body["choices"][0]["logprobs"] = {"content": [tok("something else", -0.1)]}
    reply = read_reply(prompt, body)
    assert (reply.label, reply.confidence, reply.logprobs_unread) == ("negative", None, True)
    assert "their replies carried logprobs" in replace(summary_of(), logprobs_unread=3).render()


@pytest.mark.parametrize("engine", ["online", "batch"])
def test_a_vllm_server_gives_every_row_a_confidence(sim: Any, tmp_path: Path, engine: str) -> None:
    """Against a server that answers like vLLM (stop token after the logprobs, JSON padded with whitespace),
    online and batch runs store a confidence for every row, the same one OpenAI's shape gives."""
    rows = reviews(20)
    source = write_csv(tmp_path / "in.csv", rows)
    run = label if engine == "online" else label_batch
    if engine == "batch":
        sim.configure(batch_seconds=0)
    plain = tmp_path / "openai.jsonl"
    run(sim, source, plain)
    sim.configure(server="vllm", pad_whitespace=2)
    out = tmp_path / "vllm.jsonl"
    summary = run(sim, source, out)
    assert (summary.labeled, summary.logprobs_unread) == (20, 0)
    got = {r["id"]: r["confidence"] for r in open_sink(out).iter_records()}
    assert all(c is not None and 0 < c <= 1 for c in got.values()), got
    assert got == {r["id"]: r["confidence"] for r in open_sink(plain).iter_records()}


def test_eval_does_not_blame_the_endpoint_for_a_missing_confidence(sim: Any, tmp_path: Path) -> None:
    """eval names both reasons a row can lack a confidence rather than claiming the endpoint sent no logprobs."""
    sim.configure(logprobs="ignore")
    source = write_csv(tmp_path / "in.csv", [(i, lang, text, "neutral") for i, lang, text in reviews(5)],
                       header=("id", "lang", "text", "gold"))  # fmt: skip
    out = tmp_path / "out.jsonl"
    assert label(sim, source, out).labeled == 5
    scored = cli("eval", str(out), "--gold", str(source), "--gold-column", "gold")
    assert scored.returncode == 0, scored.stderr
    assert "no logprobs from the endpoint" not in scored.stdout
    assert "5 labeled rows have no confidence (their replies carried no logprobs, or logprobs" in scored.stdout


def test_tokens_that_lost_their_leading_space_still_place_the_label() -> None:
    """Tokens decoded one by one without their leading space (SentencePiece: `▁"` comes back as `"`), ending with
    `</s>`, still give the label's probability, renormalised against rivals compared without whitespace."""
    spaced = '{"label": "negative"}'
    tokens = [tok('{"', 0), tok("label", 0), tok('":', 0), tok('"', 0), tok("neg", math.log(0.8)),
              tok("ative", math.log(0.9)), tok('"}', 0), tok("</s>", 0)]  # fmt: skip
    assert label_confidence(spaced, tokens, "negative", "label", LABELS) == pytest.approx(0.72)
    first = tok('"pos', math.log(0.6), ('"pos', math.log(0.6)), ('"neg', math.log(0.2)), ("{", math.log(0.1)))
    rivals = [tok('{"label":', 0), first, tok('itive"', 0), tok("}", 0), tok("</s>", 0)]
    assert label_confidence('{"label": "positive"\n}', rivals, "positive", "label", LABELS) == pytest.approx(0.75)
    other_text = [*tokens[:-2], tok('"', 0), tok("x", 0), tok("}", 0)]
    assert label_confidence(spaced, other_text, "negative", "label", LABELS) is None
