"""Confidence from logprobs: how it is computed, stored per row, missing without failing, and --review-below."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from pipeline.confidence import label_confidence
from pipeline.sinks import open_sink

from .helpers import ROOT, cli, dead_letters, label, reviews, sink_ids, write_csv
from .test_cli import label_args

LABELS = ("positive", "negative", "neutral")


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
