"""`labelstream compare`, the scoring half: each candidate's sink against the gold sample, side by side.

A candidate is one task file with one model, labeled into its own sink. Its row in the table comes from the
same readers `eval` and the report use (analysis/evaluate.py, analysis/overview.py): accuracy, macro-F1,
Cohen's kappa, coverage of the sample, cost per 1,000 rows at standard and batch prices, p50/p95 latency and
rows still dead-lettered. Pairwise agreement is the share of rows both candidates labeled where their labels
are equal. The pick is the cheapest candidate whose macro-F1 is within the tolerance of the best one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pipeline.analysis.evaluate import evaluate
from pipeline.analysis.overview import overview
from pipeline.analysis.report import card, page, shade
from pipeline.sinks import open_sink
from pipeline.tables import table
from pipeline.task.config import TaskConfig


@dataclass(frozen=True, slots=True)
class Candidate:
    """One task file with one model, and the sink its sample labels go to."""

    config: TaskConfig
    sink: Path

    @property
    def model(self) -> str:
        """The model this candidate asks."""
        return self.config.model

    @property
    def task(self) -> str:
        """The task file's name, as the table shows it."""
        return Path(self.config.source).stem

    @property
    def name(self) -> str:
        """`task × model`."""
        return f"{self.task} × {self.model}"


def candidates(configs: Sequence[TaskConfig], models: Sequence[str], folder: Path) -> list[Candidate]:
    """Every model × task-file pair, each with a sink of its own under `folder` (names safe for any filesystem)."""
    out: list[Candidate] = []
    for config in configs:
        for model in models or [config.model]:
            task = config.with_overrides(model=model)
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(config.source).stem}.{model}")
            out.append(Candidate(task, folder / f"{stem}.jsonl"))
    return out


@dataclass(slots=True)
class Score:
    """One candidate's row of the table."""

    candidate: Candidate
    sample_rows: int = 0
    labeled: int = 0
    accuracy: float = 0.0
    macro_f1: float = 0.0
    kappa: float | None = None
    cost_1k: float | None = None  # USD per 1,000 rows, standard tier
    batch_1k: float | None = None  # the same at batch prices
    p50_ms: float | None = None
    p95_ms: float | None = None
    failed: int = 0

    @property
    def coverage(self) -> float:
        """Share of the sample the candidate labeled."""
        return self.labeled / self.sample_rows if self.sample_rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "candidate": self.candidate.name,
            "task": self.candidate.config.source,
            "model": self.candidate.model,
            "sink": str(self.candidate.sink),
            "sample_rows": self.sample_rows,
            "labeled": self.labeled,
            "coverage": round(self.coverage, 4),
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "kappa": None if self.kappa is None else round(self.kappa, 4),
            "cost_per_1k_standard": self.cost_1k,
            "cost_per_1k_batch": self.batch_1k,
            "latency_p50_ms": self.p50_ms,
            "latency_p95_ms": self.p95_ms,
            "failed": self.failed,
        }


def score(candidate: Candidate, sample: Path, gold_column: str) -> Score:
    """Score one candidate's sink against the sample's gold column."""
    result = Score(candidate)
    evaluation = evaluate(candidate.sink, sample, gold_column)
    result.sample_rows, result.labeled = evaluation.gold_rows, evaluation.labeled
    result.accuracy, result.macro_f1, result.kappa = evaluation.accuracy, evaluation.macro_f1, evaluation.kappa
    view = overview(candidate.sink)
    if view.rows:
        standard, batch = view.costs.get("standard"), view.costs.get("batch")
        result.cost_1k = None if standard is None else standard * 1000 / view.rows
        result.batch_1k = None if batch is None else batch * 1000 / view.rows
    result.p50_ms, result.p95_ms = view.latency_ms.get("p50"), view.latency_ms.get("p95")
    result.failed = failed_unlabeled(candidate.sink)
    return result


def failed_unlabeled(path: Path) -> int:
    """Rows dead-lettered and not labeled since (what `status` calls failed_unlabeled)."""
    sink = open_sink(path)
    done = sink.load_done(repair=False)
    letters = sink.meta.read_dead_letters()
    return len({row_id for letter in letters if (row_id := str(letter.get("id"))) not in done})


def agreement(sinks: Sequence[Path]) -> list[list[float | None]]:
    """Pairwise agreement: the share of rows both sinks labeled on which their labels are equal (None: none)."""
    labels = []
    for path in sinks:
        by_id: dict[str, Any] = {}
        for item in open_sink(path).iter_records(columns=["id", "label"]):
            value = item["label"]
            by_id[str(item["id"])] = frozenset(value) if isinstance(value, list) else value
        labels.append(by_id)
    out: list[list[float | None]] = []
    for a in labels:
        line: list[float | None] = []
        for b in labels:
            common = a.keys() & b.keys()
            line.append(sum(a[k] == b[k] for k in common) / len(common) if common else None)
        out.append(line)
    return out


@dataclass(slots=True)
class Comparison:
    """The whole comparison: scores, pairwise agreement, and the pick within the tolerance."""

    sample: Path
    gold_column: str
    tolerance: float
    scores: list[Score]
    agreement: list[list[float | None]] = field(default_factory=list)

    @property
    def best(self) -> Score | None:
        """The candidate with the highest macro-F1."""
        scored = [s for s in self.scores if s.labeled]
        return max(scored, key=lambda s: s.macro_f1) if scored else None

    @property
    def pick(self) -> Score | None:
        """The cheapest candidate whose macro-F1 is within `tolerance` of the best (the better one on a tie)."""
        best = self.best
        if best is None:
            return None
        near = [s for s in self.scores if s.labeled and s.macro_f1 >= best.macro_f1 - self.tolerance - 1e-12]
        return min(near, key=lambda s: (math.inf if s.cost_1k is None else s.cost_1k, -s.macro_f1))

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        pick = self.pick
        return {
            "sample": str(self.sample),
            "gold_column": self.gold_column,
            "tolerance": self.tolerance,
            "candidates": [s.as_dict() for s in self.scores],
            "agreement": self.agreement,
            "pick": pick.candidate.name if pick else None,
        }

    def render(self) -> str:
        """The table for a terminal, then pairwise agreement."""
        rows = [
            [
                s.candidate.name,
                f"{s.accuracy:.3f}",
                f"{s.macro_f1:.3f}",
                "–" if s.kappa is None else f"{s.kappa:.3f}",
                f"{s.coverage:.1%}",
                _usd(s.cost_1k),
                _usd(s.batch_1k),
                _ms(s.p50_ms),
                _ms(s.p95_ms),
                s.failed,
            ]
            for s in self.scores
        ]
        head = ["candidate", "accuracy", "macro-F1", "kappa", "coverage", "$/1k rows", "$/1k batch", "p50", "p95"]
        lines = [f"compare on {self.sample} (gold column {self.gold_column!r}, {self._rows()} rows)", ""]
        lines += table([*head, "failed"], rows)
        if len(self.scores) > 1:
            names = [f"#{i + 1}" for i in range(len(self.scores))]
            lines += ["", "  pairwise agreement (share of rows both labeled with the same label)"]
            lines += table(
                ["", *names],
                [[f"#{i + 1} {s.candidate.name}", *map(_share, line)] for i, (s, line) in enumerate(self._pairs())],
            )
        return "\n".join(lines)

    def _rows(self) -> int:
        return max((s.sample_rows for s in self.scores), default=0)

    def _pairs(self) -> list[tuple[Score, list[float | None]]]:
        return list(zip(self.scores, self.agreement, strict=True))

    def html(self, footer: Sequence[str] = ()) -> str:
        """The comparison as one self-contained HTML page (see analysis/report.py)."""
        pick = self.pick
        cards = [card(str(len(self.scores)), "candidates"), card(f"{self._rows():,}", "rows in the sample")]
        if pick is not None:
            cards += [card(pick.candidate.name, f"pick (macro-F1 within {self.tolerance:g} of the best, cheapest)")]
            cards += [card(f"{pick.macro_f1:.3f}", "its macro-F1"), card(_usd(pick.cost_1k), "its cost per 1,000 rows")]
        sections = [f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>', self._html_table()]
        if len(self.scores) > 1:
            sections.append(self._html_agreement())
        if footer:
            lines = "".join(f"<p><code>{escape(line)}</code></p>" for line in footer)
            sections.append(f'<section id="next"><h2>Next</h2>{lines}</section>')
        return page("labelstream compare", f"{self.sample} · gold column {self.gold_column}", sections)

    def _html_table(self) -> str:
        pick = self.pick
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "candidate", "accuracy", "macro-F1", "kappa", "coverage", "$ / 1,000 rows", "at batch prices",
                "p50 latency", "p95 latency", "failed",
            )
        )  # fmt: skip
        body = []
        for s in self.scores:
            mark = " ★" if s is pick else ""
            cells = [
                f"{s.accuracy:.3f}", f"{s.macro_f1:.3f}", "–" if s.kappa is None else f"{s.kappa:.3f}",
                f"{s.coverage:.1%}", _usd(s.cost_1k), _usd(s.batch_1k), _ms(s.p50_ms), _ms(s.p95_ms), str(s.failed),
            ]  # fmt: skip
            tds = "".join(f"<td>{escape(c)}</td>" for c in cells)
            body.append(f"<tr><td>{escape(s.candidate.name + mark)}</td>{tds}</tr>")
        return (
            f'<section id="candidates"><h2>Candidates</h2><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>"
            '<p class="note">★ the pick. Costs from the tokens each candidate used on the sample, at the price '
            "table's standard and batch prices.</p></section>"
        )

    def _html_agreement(self) -> str:
        names = [s.candidate.name for s in self.scores]
        head = "".join(f"<th>{escape(n)}</th>" for n in names)
        rows = []
        for name, line in zip(names, self.agreement, strict=True):
            cells = []
            for other, value in zip(names, line, strict=True):
                # Shaded from 50% (pale) to 100% (deep): candidates rarely agree on less than half the rows.
                background, ink = shade(max(0.0, (value or 0.0) - 0.5) * 2, True)
                tip = f"{name} and {other} agree on {_share(value)} of the rows both labeled"
                cells.append(
                    f'<td style="background:{background};color:{ink}" title="{escape(tip)}">{_share(value)}</td>'
                )
            rows.append(f"<tr><th>{escape(name)}</th>{''.join(cells)}</tr>")
        return (
            f'<section id="agreement"><h2>Pairwise agreement</h2><table class="heatmap"><thead><tr><th></th>{head}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            '<p class="note">Share of the rows both candidates labeled on which their labels are equal.</p></section>'
        )


def compare_sinks(chosen: Sequence[Candidate], sample: Path, gold_column: str, *, tolerance: float) -> Comparison:
    """Score every candidate's sink against the sample and each other."""
    scores = [score(c, sample, gold_column) for c in chosen]
    return Comparison(sample, gold_column, tolerance, scores, agreement([c.sink for c in chosen]))


def _usd(value: float | None) -> str:
    return "no price" if value is None else f"${value:.4f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"
