"""Agreement between predicted and gold labels: the arithmetic of `labelstream eval`, free of any I/O.

Single-label: accuracy, per-label precision/recall/F1, macro-F1, Cohen's kappa and the confusion matrix.
Multi-label: per-label scores with micro and macro averages, exact-match accuracy and Hamming loss, and a
gold × predicted co-occurrence matrix. Both: accuracy by confidence bucket. Undefined ratios (no prediction
of a label, no gold example of it) count as 0, and labels with neither are left out of the macro average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# Upper edges of the confidence buckets; the last bucket ends at 1 inclusive.
BUCKET_EDGES: Final = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True, slots=True)
class LabelScore:
    """Precision, recall and F1 of one label, with its gold count (support) and prediction count."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "label": self.label,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "support": self.support,
            "predicted": self.predicted,
        }


def score(label: str, tp: int, fp: int, fn: int) -> LabelScore:
    """Precision, recall and F1 from counts (0 where undefined)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return LabelScore(label, precision, recall, f1, support=tp + fn, predicted=tp + fp)


def macro_f1(scores: Iterable[LabelScore]) -> float:
    """Mean F1 over the labels that occur in the gold set or the predictions."""
    used = [s.f1 for s in scores if s.support or s.predicted]
    return sum(used) / len(used) if used else 0.0


@dataclass(frozen=True, slots=True)
class Bucket:
    """Rows whose confidence falls in [low, high): how many, how many were right, their mean confidence."""

    low: float
    high: float
    rows: int
    correct: int
    mean_confidence: float

    @property
    def accuracy(self) -> float:
        """Share of the bucket's rows that were right."""
        return self.correct / self.rows if self.rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "low": self.low,
            "high": self.high,
            "rows": self.rows,
            "accuracy": round(self.accuracy, 4),
            "mean_confidence": round(self.mean_confidence, 4),
        }


def buckets(pairs: Iterable[tuple[float, bool]]) -> list[Bucket]:
    """Accuracy by confidence bucket (see BUCKET_EDGES) from (confidence, right?) pairs; empty buckets left out."""
    rows = [0] * len(BUCKET_EDGES)
    right = [0] * len(BUCKET_EDGES)
    total = [0.0] * len(BUCKET_EDGES)
    for confidence, correct in pairs:
        i = next((k for k, edge in enumerate(BUCKET_EDGES) if confidence < edge), len(BUCKET_EDGES) - 1)
        rows[i] += 1
        right[i] += correct
        total[i] += confidence
    lows = (0.0, *BUCKET_EDGES[:-1])
    return [
        Bucket(lows[i], BUCKET_EDGES[i], rows[i], right[i], total[i] / rows[i])
        for i in range(len(BUCKET_EDGES))
        if rows[i]
    ]


class SingleLabel:
    """Counts of (gold, predicted) pairs over a label set, and the scores they give."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.matrix = [[0] * len(self.classes) for _ in self.classes]
        self._index = {c: i for i, c in enumerate(self.classes)}

    def add(self, gold: str, predicted: str) -> None:
        """Count one row (a label outside the classes becomes a class of its own)."""
        self.matrix[self._class(gold)][self._class(predicted)] += 1

    def _class(self, label: str) -> int:
        if label not in self._index:
            self._index[label] = len(self.classes)
            self.classes.append(label)
            for line in self.matrix:
                line.append(0)
            self.matrix.append([0] * len(self.classes))
        return self._index[label]

    @property
    def rows(self) -> int:
        """Rows counted."""
        return sum(map(sum, self.matrix))

    @property
    def accuracy(self) -> float:
        """Share of rows whose prediction equals the gold label."""
        n = self.rows
        return sum(self.matrix[i][i] for i in range(len(self.classes))) / n if n else 0.0

    def scores(self) -> list[LabelScore]:
        """Per-label precision, recall and F1."""
        m = self.matrix
        out = []
        for i, label in enumerate(self.classes):
            tp = m[i][i]
            predicted = sum(row[i] for row in m)
            out.append(score(label, tp, predicted - tp, sum(m[i]) - tp))
        return out

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: agreement beyond what the label frequencies give by chance (None for no rows)."""
        n = self.rows
        if not n:
            return None
        m = self.matrix
        chance = sum(sum(m[i]) * sum(row[i] for row in m) for i in range(len(m))) / (n * n)
        return 1.0 if math.isclose(chance, 1.0) else (self.accuracy - chance) / (1 - chance)


@dataclass(slots=True)
class MultiLabel:
    """Per-label counts over rows that each have a set of gold and a set of predicted labels."""

    classes: list[str]
    rows: int = 0
    exact: int = 0
    counts: dict[str, list[int]] = field(default_factory=dict)  # label → [tp, fp, fn, tn]
    cooccurrence: dict[tuple[str, str], int] = field(default_factory=dict)  # (gold, predicted) → rows

    def add(self, gold: Sequence[str], predicted: Sequence[str]) -> None:
        """Count one row."""
        g, p = set(gold), set(predicted)
        for label in sorted(g | p):
            if label not in self.classes:
                self.classes.append(label)
        self.rows += 1
        self.exact += g == p
        for label in self.classes:
            tally = self.counts.setdefault(label, [0, 0, 0, 0])
            tally[0 if label in g and label in p else 1 if label in p else 2 if label in g else 3] += 1
        for a in g:
            for b in p:
                self.cooccurrence[a, b] = self.cooccurrence.get((a, b), 0) + 1

    def scores(self) -> list[LabelScore]:
        """Per-label precision, recall and F1."""
        out = []
        for label in self.classes:
            tp, fp, fn, _ = self.counts.get(label, [0, 0, 0, 0])
            out.append(score(label, tp, fp, fn))
        return out

    def micro(self) -> LabelScore:
        """Precision, recall and F1 over every (row, label) decision at once."""
        tp = fp = fn = 0
        for label in self.classes:
            a, b, c, _ = self.counts.get(label, [0, 0, 0, 0])
            tp, fp, fn = tp + a, fp + b, fn + c
        return score("micro", tp, fp, fn)

    @property
    def exact_match(self) -> float:
        """Share of rows whose predicted set equals the gold set."""
        return self.exact / self.rows if self.rows else 0.0

    @property
    def hamming_loss(self) -> float:
        """Share of (row, label) decisions that were wrong."""
        wrong = sum(c[1] + c[2] for c in self.counts.values())
        cells = self.rows * len(self.classes)
        return wrong / cells if cells else 0.0

    def matrix(self) -> list[list[int]]:
        """Gold (rows) × predicted (columns) co-occurrence counts in `classes` order."""
        return [[self.cooccurrence.get((a, b), 0) for b in self.classes] for a in self.classes]
