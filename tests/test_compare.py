"""`labelstream compare`: the stratified sample, the candidates' runs against the simulator, the table, the report,
the pick, resuming, pricing, and the errors of bad input."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli as cli_module
from pipeline.analysis.compare import Candidate, Comparison, Score, candidates
from pipeline.analysis.sample import draw_sample
from pipeline.errors import InputError, UsageError

from .helpers import ROOT, SENTIMENT, wait_for, write_csv

SAMPLE = ROOT / "configs" / "sample_reviews.csv"
CONFIG = str(ROOT / "configs" / "sentiment.toml")
QUALITY = {"gpt-4o-mini": 0.7, "gpt-4.1-mini": 0.97, "gpt-4.1": 0.97}


def compare(sim: Any, out: Path, *extra: str, models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4.1-mini")) -> list[str]:
    """The compare command's words for two or more models on the bundled gold file."""
    words = ["compare", "--input", str(SAMPLE), "--gold-column", "gold", "--config", CONFIG, "--sample", "120"]
    for model in models:
        words += ["--model", model]
    return [*words, "--base-url", sim.base_url, "--out", str(out), "--concurrency", "8", *extra]


def gold_of(path: Path, column: str = "gold") -> list[str]:
    """The gold column of a CSV."""
    with path.open(encoding="utf-8", newline="") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def test_sample_is_stratified_seeded_and_reused(tmp_path: Path) -> None:
    """The sample keeps each gold label's share, the same seed draws the same rows, another seed others, and a
    folder drawn with other settings is refused instead of mixing samples."""
    labels = SENTIMENT.labels
    one = draw_sample(SAMPLE, "gold", labels, multi_label=False, size=90, seed=0, folder=tmp_path / "a")
    again = draw_sample(SAMPLE, "gold", labels, multi_label=False, size=90, seed=0, folder=tmp_path / "b")
    other = draw_sample(SAMPLE, "gold", labels, multi_label=False, size=90, seed=1, folder=tmp_path / "c")
    assert one.path.read_bytes() == again.path.read_bytes() != other.path.read_bytes()
    everything = Counter(gold_of(SAMPLE))
    drawn = Counter(gold_of(one.path))
    assert sum(drawn.values()) == one.rows == 90
    for label in labels:
        assert abs(drawn[label] - 90 * everything[label] / sum(everything.values())) < 1
    with pytest.raises(UsageError, match="would draw differently"):
        draw_sample(SAMPLE, "gold", labels, multi_label=False, size=50, seed=0, folder=tmp_path / "a")


def test_a_rare_label_still_gets_a_row(tmp_path: Path) -> None:
    """A label with few gold rows is not rounded out of a small sample."""
    rows = [(f"r{i}", "en", f"text {i}", "positive") for i in range(40)] + [("r99", "en", "text 99", "neutral")]
    gold = write_csv(tmp_path / "gold.csv", rows, header=("id", "lang", "text", "gold"))
    sample = draw_sample(gold, "gold", SENTIMENT.labels, multi_label=False, size=5, seed=0, folder=tmp_path / "s")
    assert sample.per_label == {"positive": 4, "neutral": 1}


def test_compare_shows_the_trade_off_picks_the_cheapest_good_enough_and_resumes(
    sim: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against models of simulated quality, the table ranks them by macro-F1, the pick is the cheapest within the
    tolerance (not the best), the report and the command are written, and a re-run sends zero requests."""
    sim.configure(model_quality=QUALITY)
    out = tmp_path / "cmp"
    words = compare(sim, out, "--tolerance", "0.05", models=("gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1"))
    assert cli_module.main([*words, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_model = {c["model"]: c for c in result["candidates"]}
    assert by_model["gpt-4.1-mini"]["macro_f1"] > by_model["gpt-4o-mini"]["macro_f1"] + 0.1
    assert all(c["coverage"] == 1.0 and c["sample_rows"] == 120 and c["failed"] == 0 for c in by_model.values())
    assert by_model["gpt-4o-mini"]["cost_per_1k_standard"] < by_model["gpt-4.1-mini"]["cost_per_1k_standard"]
    assert by_model["gpt-4.1-mini"]["cost_per_1k_batch"] == pytest.approx(
        by_model["gpt-4.1-mini"]["cost_per_1k_standard"] / 2
    )
    assert by_model["gpt-4.1"]["latency_p95_ms"] is not None
    # gpt-4.1 and gpt-4.1-mini are equally good here; the mini costs a fifth.
    assert result["pick"] == "sentiment × gpt-4.1-mini"
    assert any("--model gpt-4.1-mini" in line and "--engine batch" in line for line in result["next"])
    assert any("at batch prices" in line for line in result["next"])
    assert len(result["agreement"]) == 3 and result["agreement"][0][0] == 1.0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "Pairwise agreement" in page and "gpt-4.1-mini ★" in page
    sent = sim.stats()["requests"]
    with (out / "sample.csv").open(encoding="utf-8", newline="") as handle:
        distinct = len({row["text"] for row in csv.DictReader(handle)})
    assert sent == 3 * distinct < 360, "each candidate sends each distinct text of the 120 once (dedupe)"
    assert cli_module.main(words) == 0
    table = capsys.readouterr().out
    assert sim.stats()["requests"] == sent  # every sink was complete: nothing asked again
    assert re.search(r"sentiment × gpt-4o-mini\s+0\.\d+\s+0\.\d+", table)
    assert "pick: sentiment × gpt-4.1-mini" in table


def test_dry_run_prices_the_comparison_without_a_request(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """--dry-run draws the sample and prices each candidate's rows, sending nothing."""
    assert cli_module.main([*compare(sim, tmp_path / "cmp"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert sim.stats()["requests"] == 0
    assert "sentiment × gpt-4o-mini: 120 rows to label" in text
    assert re.search(r"total: standard \$0\.\d+, batch \$0\.\d+", text)


def test_the_pick_is_the_cheapest_within_tolerance() -> None:
    """Among candidates within the tolerance of the best macro-F1 the cheapest wins; a model without a price
    never beats one with a price."""

    def scored(model: str, f1: float, cost: float | None) -> Score:
        return Score(Candidate(SENTIMENT.with_overrides(model=model), Path(model)), 10, 10, macro_f1=f1, cost_1k=cost)

    scores = [scored("big", 0.90, 1.0), scored("mid", 0.885, 0.3), scored("small", 0.80, 0.05), scored("x", 0.9, None)]
    assert Comparison(Path("s"), "gold", 0.02, scores).pick is scores[1]
    assert Comparison(Path("s"), "gold", 0.0, scores).pick is scores[0]
    assert Comparison(Path("s"), "gold", 0.2, scores).pick is scores[2]


def test_candidates_get_their_own_sinks(tmp_path: Path) -> None:
    """Every model × task file pair has a sink of its own, named safely even for a model with a slash."""
    chosen = candidates([SENTIMENT], ["gpt-4o-mini", "org/model:1"], tmp_path)
    assert [c.sink.name for c in chosen] == ["sentiment.gpt-4o-mini.jsonl", "sentiment.org_model_1.jsonl"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"column": "verdict"}, r"has no column 'verdict'; its columns are \['id', 'lang', 'text', 'gold'\]"),
        ({"labels": ["positive", "angry", "Mixed"]}, r"not labels of the task: 'angry' ×\d+, 'Mixed' ×\d+"),
        ({"models": ["gpt-4o-mini"]}, "at least two candidates"),
    ],
)
def test_bad_input_is_a_clear_error(
    sim: Any, tmp_path: Path, capsys: Any, change: dict[str, Any], message: str
) -> None:
    """A gold file without the gold column, gold labels outside the task's set (listed) and a single candidate
    are each one line saying what to do, exit 2, before any request."""
    labels = change.get("labels", ["positive", "negative", "neutral"])
    rows = [(f"r{i}", "en", f"text {i}", labels[i % len(labels)]) for i in range(30)]
    gold = write_csv(tmp_path / "gold.csv", rows, header=("id", "lang", "text", "gold"))
    words = ["compare", "--input", str(gold), "--gold-column", change.get("column", "gold"), "--config", CONFIG]
    for model in change.get("models", ["gpt-4o-mini", "gpt-4.1-mini"]):
        words += ["--model", model]
    assert cli_module.main([*words, "--base-url", sim.base_url, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and sim.stats()["requests"] == 0


def test_labels_outside_the_set_name_the_task_labels(tmp_path: Path) -> None:
    """The error about unknown gold labels lists the task's labels, so the fix is plain."""
    gold = write_csv(tmp_path / "g.csv", [("1", "en", "t", "great")], header=("id", "lang", "text", "gold"))
    with pytest.raises(InputError, match=r"task's labels are \['positive', 'negative', 'neutral'\]"):
        draw_sample(gold, "gold", SENTIMENT.labels, multi_label=False, size=5, seed=0, folder=tmp_path / "s")


def test_simulated_model_quality_is_the_share_that_agrees_with_the_judge(sim: Any, tmp_path: Path) -> None:
    """--model-quality makes a model agree with the simulator's judge on about that share of rows, the same rows
    every time, and leaves other models alone."""
    from .helpers import label, sink_ids  # noqa: PLC0415 - only this test labels directly

    rows = [(f"r{i:04d}", "en", f"great, love it, works well {i}") for i in range(400)]
    data = write_csv(tmp_path / "in.csv", rows)
    sim.configure(model_quality={"weak": 0.6})

    def labels(model: str, name: str) -> dict[str, str]:
        out = tmp_path / name
        label(sim, data, out, config=SENTIMENT.with_overrides(model=model))
        assert len(sink_ids(out)) == 400
        records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return {r["id"]: r["label"] for r in records}

    strong, weak, again = labels("strong", "a.jsonl"), labels("weak", "b.jsonl"), labels("weak", "c.jsonl")
    assert set(strong.values()) == {"positive"}
    assert 0.5 < list(weak.values()).count("positive") / 400 < 0.7
    assert weak == again


def test_candidates_of_one_model_share_its_limits(tmp_path: Path) -> None:
    """Two task files on the same model each take half of --rpm (the provider counts the model's limit once);
    candidates of different models keep the whole of their own."""
    from pipeline.ratelimit.limiter import LimitSettings  # noqa: PLC0415
    from pipeline.run.compare import CompareSettings, candidate_options, prepare_compare  # noqa: PLC0415

    second = tmp_path / "terse.toml"
    second.write_text(Path(CONFIG).read_text(encoding="utf-8").replace("You label", "Label"), encoding="utf-8")
    settings = CompareSettings(
        gold=SAMPLE,
        configs=[Path(CONFIG), second],
        models=["gpt-4o-mini"],
        gold_column="gold",
        sample_size=30,
        out=tmp_path / "cmp",
        limits=LimitSettings(concurrency=4, rpm=600),
    )
    sample, chosen = prepare_compare(settings)
    assert [o.limits.share for o in candidate_options(settings, sample, chosen)] == [0.5, 0.5]
    mixed = dataclasses.replace(settings, configs=[Path(CONFIG)], models=["gpt-4o-mini", "gpt-4.1-mini"])
    sample, chosen = prepare_compare(mixed)
    assert [o.limits.share for o in candidate_options(mixed, sample, chosen)] == [1.0, 1.0]


@pytest.mark.crash
def test_ctrl_c_saves_every_candidate_and_the_rerun_finishes(sim: Any, tmp_path: Path) -> None:
    """Ctrl-C during a compare exits 130 with one resume line and no traceback, leaves every sink readable without
    repeated ids, and the same command then finishes the comparison."""
    from .helpers import sink_ids, start_cli  # noqa: PLC0415 - only this test runs the CLI in a subprocess

    sim.configure(latency_ms=100)
    out = tmp_path / "cmp"
    words = compare(sim, out)
    words[words.index("--concurrency") + 1] = "2"
    proc = start_cli(*words)
    sinks = [out / "sentiment.gpt-4o-mini.jsonl", out / "sentiment.gpt-4.1-mini.jsonl"]

    def some_saved() -> bool:
        return all(path.exists() and path.stat().st_size > 0 for path in sinks)

    wait_for(some_saved, what="both candidates to save rows")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "re-run the same compare to resume" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    for path in sinks:
        saved = sink_ids(path)
        assert 0 < len(saved) < 120 and len(saved) == len(set(saved))
    sim.configure(latency_ms=0)
    assert cli_module.main(words) == 0
    assert all(sorted(sink_ids(path)) == sorted(set(sink_ids(path))) and len(sink_ids(path)) == 120 for path in sinks)


def test_multi_label_tasks_compare_on_label_sets(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """A multi-label task's gold cells (lists or `;`-separated) are sampled by label set and scored; the table
    shows exact-match accuracy for every candidate."""
    topics = str(ROOT / "configs" / "topics.toml")
    texts = [
        ("Charged twice", "Please refund the second charge on my invoice", "billing"),
        ("Where is my parcel", "Tracking has not moved for a week, delivery late", "shipping"),
        ("Cannot log in", "Password reset does not work for my account", "account"),
        ("Refund for a lost parcel", "The parcel was lost; I want my money back", "billing;shipping"),
    ]
    rows = [(f"t{i}", "email", s, b, g) for i in range(40) for s, b, g in [texts[i % 4]]]
    gold = write_csv(tmp_path / "gold.csv", rows, header=("ticket_id", "channel", "subject", "body", "topics"))
    words = ["compare", "--input", str(gold), "--gold-column", "topics", "--config", topics, "--sample", "20"]
    words += ["--model", "gpt-4o-mini", "--model", "gpt-4.1-mini", "--base-url", sim.base_url]
    assert cli_module.main([*words, "--out", str(tmp_path / "cmp"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["coverage"] for c in result["candidates"]] == [1.0, 1.0]
    sample = json.loads((tmp_path / "cmp" / "sample.json").read_text(encoding="utf-8"))
    assert sample["per_label"] == {"account": 5, "billing": 5, "billing+shipping": 5, "shipping": 5}


def test_a_failing_candidate_is_reported_and_the_others_compared(sim: Any, tmp_path: Path, capsys: Any) -> None:
    """A candidate the endpoint refuses (unknown model) is named with the provider's reason, the other candidates
    are still compared, and the exit code is 1."""
    sim.configure(models=["gpt-4o-mini", "gpt-4.1-mini"])
    words = compare(sim, tmp_path / "cmp", models=("gpt-4o-mini", "gpt-4.1-mini", "no-such-model"))
    assert cli_module.main([*words, "--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "sentiment.no-such-model.jsonl: failed:" in captured.err and "no-such-model" in captured.err
    assert {c["model"]: c["coverage"] for c in result["candidates"]}["gpt-4o-mini"] == 1.0
    assert result["pick"] is not None and "no-such-model" not in result["pick"]


def test_without_a_key_for_a_remote_endpoint_compare_stops_before_any_work(tmp_path: Path, capsys: Any) -> None:
    """No API key and a non-local endpoint: one error saying what to set, before a sample is drawn."""
    words = ["compare", "--input", str(SAMPLE), "--gold-column", "gold", "--config", CONFIG, "--model", "a"]
    words += ["--model", "b", "--base-url", "https://api.example.com/v1", "--out", str(tmp_path / "cmp")]
    with pytest.MonkeyPatch.context() as env:
        env.delenv("OPENAI_API_KEY", raising=False)
        assert cli_module.main(words) == 2
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_model_quality_settings_are_checked() -> None:
    """A quality outside 0..1 is refused by the simulator's settings and by `simulate --model-quality`."""
    from pipeline.commands.simulate import model_quality  # noqa: PLC0415
    from pipeline.simulator import SimulatorConfig  # noqa: PLC0415

    assert model_quality("gpt-4o-mini=0.8, org/m:1=1") == {"gpt-4o-mini": 0.8, "org/m:1": 1.0}
    with pytest.raises(ValueError, match=r"model_quality of 'm' must lie in 0\.\.1"):
        SimulatorConfig(model_quality={"m": 1.5})
    with pytest.raises(argparse.ArgumentTypeError, match="MODEL=Q"):
        model_quality("0.8")
