"""`labelstream eval`: the metrics, the gold file forms it reads, and its tables and JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.analysis.metrics import MultiLabel, SingleLabel, buckets, macro_f1

from .helpers import ROOT, cli, label, reviews, write_csv
from .test_cli import label_args

SAMPLE = ROOT / "configs" / "sample_reviews.csv"


def test_single_label_metrics_match_a_worked_example() -> None:
    """Accuracy, per-label P/R/F1, macro-F1 and Cohen's kappa equal hand-computed values."""
    m = SingleLabel(["a", "b"])
    for gold, predicted, n in [("a", "a", 20), ("a", "b", 5), ("b", "a", 10), ("b", "b", 15)]:
        for _ in range(n):
            m.add(gold, predicted)
    assert m.accuracy == pytest.approx(0.7)
    a, b = m.scores()
    assert (a.precision, a.recall, a.support) == (pytest.approx(20 / 30), pytest.approx(0.8), 25)
    assert b.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # chance agreement: 0.5*0.6 + 0.5*0.4 = 0.5, so kappa = (0.7 - 0.5) / 0.5
    assert m.kappa == pytest.approx(0.4)
    assert macro_f1(m.scores()) == pytest.approx((a.f1 + b.f1) / 2)
    m.add("c", "a")  # a gold value outside the label set becomes a class of its own
    assert m.classes == ["a", "b", "c"] and m.matrix[2] == [1, 0, 0]


def test_macro_f1_leaves_out_labels_nobody_used() -> None:
    """A label with no gold rows and no predictions does not drag the macro average down."""
    m = SingleLabel(["a", "b", "unused"])
    m.add("a", "a")
    m.add("b", "b")
    assert macro_f1(m.scores()) == 1.0


def test_multi_label_metrics() -> None:
    """Per-label and micro scores, exact match and Hamming loss over label sets."""
    m = MultiLabel(["x", "y", "z"])
    m.add(["x", "y"], ["x", "y"])
    m.add(["x"], ["x", "z"])
    m.add(["y", "z"], ["y"])
    assert m.exact_match == pytest.approx(1 / 3)
    micro = m.micro()
    assert (micro.precision, micro.recall) == (pytest.approx(4 / 5), pytest.approx(4 / 5))
    assert m.hamming_loss == pytest.approx(2 / 9)
    z = next(s for s in m.scores() if s.label == "z")
    assert (z.precision, z.recall) == (0.0, 0.0)
    assert m.matrix()[0] == [2, 1, 1]  # gold x co-occurs with predicted x twice, y and z once


def test_confidence_buckets() -> None:
    """Rows fall in fixed buckets; each reports its accuracy and mean confidence; 1.0 lands in the last one."""
    got = buckets([(0.3, False), (0.35, True), (0.92, True), (1.0, True)])
    assert [(b.low, b.high, b.rows, b.accuracy) for b in got] == [(0.0, 0.5, 2, 0.5), (0.9, 0.95, 1, 1.0),
                                                                   (0.99, 1.0, 1, 1.0)]  # fmt: skip
    assert got[0].mean_confidence == pytest.approx(0.325)


def test_eval_prints_aligned_tables_and_json(sim: Any, tmp_path: Path) -> None:
    """On the sample: a headline, a per-label table, the confusion matrix and accuracy by confidence, columns
    aligned; --json has the same figures."""
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, SAMPLE, out)).returncode == 0
    shown = cli("eval", str(out), "--gold", str(SAMPLE), "--gold-column", "gold")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert re.search(r"accuracy 0\.\d{3}   macro-F1 0\.\d{3}   Cohen's kappa 0\.\d{3}", text)
    for block in ("label     precision", "confusion matrix (rows: gold, columns: predicted)", "accuracy by confidence"):
        assert block in text
    table = text.split("confusion matrix")[1].splitlines()[1:5]
    ends = {len(line) for line in table}
    assert len(ends) == 1, table  # right-aligned counts end in the same column
    data = json.loads(cli("eval", str(out), "--gold", str(SAMPLE), "--gold-column", "gold", "--json").stdout)
    assert f"accuracy {data['accuracy']:.3f}" in text
    assert sum(map(sum, data["confusion"]["matrix"])) == data["labeled"] == 300
    assert [s["label"] for s in data["per_label"]] == ["positive", "negative", "neutral"]
    assert sum(b["rows"] for b in data["by_confidence"]) == 300


def test_coverage_counts_gold_rows_without_a_label(sim: Any, tmp_path: Path) -> None:
    """Gold rows the sink has no label for lower coverage, not accuracy; empty gold cells are not gold rows."""
    rows = reviews(20)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    label(sim, source, out, max_rows=15)
    gold = write_csv(
        tmp_path / "gold.csv", [(r[0], "positive" if i else "") for i, r in enumerate(rows)], ("id", "label")
    )
    data = json.loads(cli("eval", str(out), "--gold", str(gold), "--json").stdout)
    assert (data["gold_rows"], data["labeled"], data["without_label"]) == (19, 14, 5)
    assert data["coverage"] == pytest.approx(14 / 19, abs=1e-4)


def test_gold_for_content_hash_ids_is_matched_by_text(sim: Any, tmp_path: Path) -> None:
    """Without an id column, gold rows are matched by the same content hash of their text."""
    rows = reviews(12)
    source = write_csv(tmp_path / "in.csv", [(r[2], r[1]) for r in rows], ("text", "lang"))
    out = tmp_path / "out.jsonl"
    label(sim, source, out)
    gold = write_csv(tmp_path / "gold.csv", [(r[2], "neutral") for r in rows], ("text", "label"))
    data = json.loads(cli("eval", str(out), "--gold", str(gold), "--json").stdout)
    assert (data["gold_rows"], data["labeled"]) == (12, 12)


def test_multi_label_eval_reads_lists_and_separators(sim: Any, tmp_path: Path) -> None:
    """A multi-label sink is scored per label with micro/macro F1; gold cells may be JSON lists or ';'-separated."""
    source = tmp_path / "in.csv"
    source.write_text(
        "ticket_id,subject,body\n1,환불 요청,결제가 두 번 됐어요\n2,Late order,Where is my parcel?\n"
        "3,Login,Password reset never arrives\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, source, out, "--config", "configs/topics.toml")).returncode == 0
    gold = tmp_path / "gold.csv"
    gold.write_text('ticket_id,topics\n1,"[""billing""]"\n2,shipping\n3,account;other\n', encoding="utf-8")
    result = cli("eval", str(out), "--gold", str(gold), "--gold-column", "topics", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["multi_label"] and data["gold_rows"] == 3
    assert data["micro"] is not None and data["hamming_loss"] is not None and data["kappa"] is None
    assert {s["label"] for s in data["per_label"]} == {"billing", "shipping", "account", "product", "other"}
    shown = cli("eval", str(out), "--gold", str(gold), "--gold-column", "topics").stdout
    assert "exact match" in shown and "micro-F1" in shown and "label co-occurrence" in shown


def test_a_missing_gold_column_is_a_usage_error(sim: Any, tmp_path: Path) -> None:
    """Naming a gold column the file lacks exits 2 and lists the columns it has."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "in.csv", reviews(3)), out)
    result = cli("eval", str(out), "--gold", str(SAMPLE), "--gold-column", "truth")
    assert result.returncode == 2
    assert "has no column 'truth'" in result.stderr and "'gold'" in result.stderr
