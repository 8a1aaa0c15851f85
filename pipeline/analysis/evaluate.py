"""`labelstream eval`: the sink's labels against hand-checked (gold) labels.

The gold file (CSV, JSONL or Parquet) has the sink's id column (or, for content-hash ids, the columns the
text is built from) and a column of gold labels: the labeled input itself with one more column will do, and so will the
review file that `--review-below` writes once `review_label` is filled in. Rows with an empty gold cell are
not part of the evaluation; gold rows the sink has no label for count against coverage.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.analysis.export import input_reader
from pipeline.analysis.metrics import Bucket, LabelScore, MultiLabel, SingleLabel, buckets, macro_f1
from pipeline.api.confidence import WHY_NO_CONFIDENCE
from pipeline.errors import InputError, SinkError, UsageError
from pipeline.input.ids import IdMap
from pipeline.input.sources import input_source
from pipeline.sinks import Manifest, open_sink
from pipeline.tables import table
from pipeline.task.config import TaskConfig


class Predictions:
    """The sink's labels and confidences by id, compactly (an id map into two arrays and the distinct labels)."""

    def __init__(self) -> None:
        self.index = IdMap()
        self.labels: list[Any] = []
        self._distinct: dict[Any, int] = {}
        self.which = array("I")
        self.confidence = array("f")

    def add(self, row_id: str, label: Any, confidence: Any) -> None:
        """Remember one record (a later record of the same id wins)."""
        value = tuple(label) if isinstance(label, list) else label
        slot = self._distinct.setdefault(value, len(self.labels))
        if slot == len(self.labels):
            self.labels.append(value)
        self.index.set(row_id, len(self.which))
        self.which.append(slot)
        self.confidence.append(float(confidence) if isinstance(confidence, int | float) else math.nan)

    def get(self, row_id: str) -> tuple[Any, float | None] | None:
        """(label, confidence or None) of an id, or None when the sink has no label for it."""
        at = self.index.get(row_id)
        if at is None:
            return None
        confidence = self.confidence[at]
        return self.labels[self.which[at]], None if math.isnan(confidence) else confidence

    def __len__(self) -> int:
        return len(self.which)


@dataclass(slots=True)
class Evaluation:
    """Everything `eval` reports; `as_dict` is its --json form, `render` its terminal form."""

    sink: str
    gold: str
    gold_column: str
    model: str | None
    multi_label: bool
    labels: list[str]
    gold_rows: int = 0
    labeled: int = 0
    unknown_gold: dict[str, int] = field(default_factory=dict)
    scores: list[LabelScore] = field(default_factory=list)
    accuracy: float = 0.0  # exact-match accuracy for multi-label
    macro_f1: float = 0.0
    kappa: float | None = None
    micro: LabelScore | None = None
    hamming_loss: float | None = None
    matrix: list[list[int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    without_confidence: int = 0

    @property
    def missing(self) -> int:
        """Gold rows the sink has no label for."""
        return self.gold_rows - self.labeled

    @property
    def coverage(self) -> float:
        """Share of gold rows that have a label."""
        return self.labeled / self.gold_rows if self.gold_rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "sink": self.sink,
            "gold": self.gold,
            "gold_column": self.gold_column,
            "model": self.model,
            "multi_label": self.multi_label,
            "gold_rows": self.gold_rows,
            "labeled": self.labeled,
            "without_label": self.missing,
            "coverage": round(self.coverage, 4),
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "kappa": None if self.kappa is None else round(self.kappa, 4),
            "micro": None if self.micro is None else self.micro.as_dict(),
            "hamming_loss": None if self.hamming_loss is None else round(self.hamming_loss, 4),
            "per_label": [s.as_dict() for s in self.scores],
            "confusion": {"classes": self.classes, "matrix": self.matrix},
            "by_confidence": [b.as_dict() for b in self.buckets],
            "without_confidence": self.without_confidence,
            "unknown_gold_labels": self.unknown_gold,
        }

    def render(self) -> str:
        """Aligned tables for a terminal."""
        lines = [
            f"eval {self.sink} against {self.gold} (column {self.gold_column!r}, model {self.model}): "
            f"{self.gold_rows:,} gold rows, {self.labeled:,} labeled (coverage {self.coverage:.1%}), "
            f"{self.missing:,} without a label",
        ]
        if self.multi_label and self.micro is not None:
            lines.append(
                f"  exact match {self.accuracy:.3f}   micro-F1 {self.micro.f1:.3f} (P {self.micro.precision:.3f}, "
                f"R {self.micro.recall:.3f})   macro-F1 {self.macro_f1:.3f}   Hamming loss {self.hamming_loss:.3f}"
            )
        else:
            kappa = "–" if self.kappa is None else f"{self.kappa:.3f}"
            lines.append(f"  accuracy {self.accuracy:.3f}   macro-F1 {self.macro_f1:.3f}   Cohen's kappa {kappa}")
        if self.unknown_gold:
            shown = ", ".join(f"{k!r} ×{v}" for k, v in list(self.unknown_gold.items())[:5])
            lines.append(f"  gold values that are not labels of this task (scored as their own class): {shown}")
        rows = [
            [s.label, f"{s.precision:.3f}", f"{s.recall:.3f}", f"{s.f1:.3f}", s.support, s.predicted]
            for s in self.scores
        ]
        lines += ["", *table(["label", "precision", "recall", "F1", "support", "predicted"], rows)]
        what = "label co-occurrence" if self.multi_label else "confusion matrix"
        lines += ["", f"  {what} (rows: gold, columns: predicted)"]
        lines += table(
            ["gold \\ predicted", *self.classes], [[c, *m] for c, m in zip(self.classes, self.matrix, strict=True)]
        )
        if self.buckets:
            lines += ["", "  accuracy by confidence" + (" (exact match)" if self.multi_label else "")]
            rows = [
                [f"{b.low:.2f}–{b.high:.2f}", b.rows, f"{b.accuracy:.3f}", f"{b.mean_confidence:.3f}"]
                for b in self.buckets
            ]
            lines += table(["confidence", "rows", "accuracy", "mean confidence"], rows)
        if self.without_confidence:
            lines.append(f"  {self.without_confidence:,} labeled rows have no confidence ({WHY_NO_CONFIDENCE})")
        return "\n".join(lines)


def evaluate(sink_path: str | Path, gold_path: str | Path, gold_column: str = "label") -> Evaluation:
    """Compare a sink's labels with the gold column of a CSV, JSONL or Parquet file (see the module docstring)."""
    sink_path = Path(sink_path)
    sink = open_sink(sink_path)
    manifest = sink.meta.read_manifest()
    if not sink.exists() or manifest is None or manifest.identity is None:
        raise SinkError(f"{sink_path} is not a labelstream sink with a manifest; label something into it first.")
    identity = manifest.identity
    labels = list(identity.labels)
    predictions = Predictions()
    for item in sink.iter_records(columns=["id", "label", "confidence"]):
        predictions.add(str(item["id"]), item["label"], item.get("confidence"))
    result = Evaluation(
        sink=str(sink_path),
        gold=str(gold_path),
        gold_column=gold_column,
        model=identity.model,
        multi_label=identity.multi_label,
        labels=labels,
    )
    canonical = {label.casefold(): label for label in labels}
    single = SingleLabel(list(labels))
    multi = MultiLabel(list(labels))
    sure: list[tuple[float, bool]] = []
    for row_id, raw in gold_rows(manifest, gold_path, gold_column):
        gold = _gold_labels(raw, canonical, multi=identity.multi_label, unknown=result.unknown_gold)
        if not gold:
            continue
        result.gold_rows += 1
        found = predictions.get(row_id)
        if found is None:
            continue
        result.labeled += 1
        label, confidence = found
        predicted = list(label) if identity.multi_label else [label]
        if identity.multi_label:
            multi.add(gold, predicted)
        else:
            single.add(gold[0], predicted[0])
        if confidence is None:
            result.without_confidence += 1
        else:
            sure.append((confidence, set(gold) == set(predicted)))
    result.buckets = buckets(sure)
    if identity.multi_label:
        result.scores, result.micro = multi.scores(), multi.micro()
        result.accuracy, result.hamming_loss = multi.exact_match, multi.hamming_loss
        result.classes, result.matrix = multi.classes, multi.matrix()
    else:
        result.scores, result.accuracy, result.kappa = single.scores(), single.accuracy, single.kappa
        result.classes, result.matrix = single.classes, single.matrix
    result.macro_f1 = macro_f1(result.scores)
    return result


def _gold_labels(raw: str, canonical: dict[str, str], *, multi: bool, unknown: dict[str, int]) -> list[str]:
    """The gold label(s) of a cell: one label, or for multi-label a JSON list or `;`/`|`/`,`-separated names."""
    text = raw.strip()
    if not text:
        return []
    if not multi:
        parts = [text]
    elif text.startswith("["):
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = None
        parts = [str(v) for v in value] if isinstance(value, list) else [text]
    elif text.casefold() in canonical:
        parts = [text]
    else:
        separator = next((s for s in (";", "|", ",") if s in text), None)
        parts = text.split(separator) if separator else [text]
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        label = canonical.get(part.casefold())
        if label is None:
            unknown[part] = unknown.get(part, 0) + 1
            label = part
        out.append(label)
    return list(dict.fromkeys(out))


def gold_rows(manifest: Manifest, path: str | Path, column: str) -> Iterator[tuple[str, str]]:
    """(id, gold cell) for each row of a gold CSV, JSONL or Parquet file (or a Label Studio JSON export), with ids
    made the way the sink's runs made them."""
    if str(path).lower().endswith(".json"):  # a Label Studio JSON export: its annotations are the gold
        from pipeline.analysis.labelstudio import export_gold  # noqa: PLC0415 - only for JSON gold

        yield from export_gold(Path(path), manifest, column)
        return
    header = _header(path)
    if column not in header:
        raise UsageError(f"{path} has no column {column!r}; its columns are {header}. Pass --gold-column NAME.")
    id_column = manifest.input.get("id_column")
    if id_column and id_column in header:
        # Ids come straight from the id column: the text columns need not be there.
        config = _bare_config(id_column=id_column, text_column=column)
        with input_source(path, config) as source:
            for batch in source.batches():
                for row in batch:
                    if row.problem is None:  # empty gold cells (and rows without an id) are not gold
                        yield row.id, row.text
        return
    if id_column:
        raise InputError(f"{path} has no {id_column!r} column, which the sink's ids come from; columns are {header}.")
    where = header.index(column)
    with input_reader(manifest, path) as source:  # content-hash ids: the same text makes the same id
        for fields, row in source.records():
            if not row.problem and where < len(fields):
                yield row.id, fields[where]


def _bare_config(*, id_column: str | None = None, text_column: str = "text", template: str | None = None) -> TaskConfig:
    return TaskConfig(
        name="gold", instructions="", labels=(), label_descriptions=(), id_column=id_column,
        text_column=text_column, template=template, max_chars=2**31,
    )  # fmt: skip


def _header(path: str | Path) -> list[str]:
    """The gold file's columns (an empty template asks for none, so opening checks nothing)."""
    with input_source(path, _bare_config(template="")) as source:
        return source.header
