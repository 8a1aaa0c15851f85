"""`--report report.html`: one self-contained HTML page about a sink (and, from `eval`, its agreement with gold).

Everything is inline: CSS in a style element, charts as SVG, no script, no font, no image file, and a
Content-Security-Policy that forbids loading anything, so the page renders the same offline, from an email
attachment, or years later. Sections: summary figures, the confusion matrix as a heatmap and per-label scores
(eval only), the label distribution, the confidence histogram and accuracy by confidence, cost and latency.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Final

from pipeline.analysis.evaluate import Evaluation
from pipeline.analysis.overview import BINS, Overview, overview
from pipeline.api.confidence import WHY_NO_CONFIDENCE
from pipeline.errors import StorageError
from pipeline.results import now_iso
from pipeline.stats import short_duration, short_number

_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_STYLE: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans KR",sans-serif;color:#1f2328;margin:0;
background:#f6f8fa}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 12px}
.sub{color:#59636e;margin:0 0 20px;overflow-wrap:anywhere}
section{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:16px 20px;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 150px;border:1px solid #d1d9e0;border-radius:6px;padding:10px 12px;background:#fff}
.card b{display:block;font-size:20px}.card span{color:#59636e;font-size:12px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;text-align:right;border-bottom:1px solid #eef1f4}
th:first-child,td:first-child{text-align:left}
table.heatmap td{min-width:56px;text-align:center;border:1px solid #fff;font-weight:600}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
svg text{font:12px system-ui,sans-serif;fill:#1f2328}
.note{color:#59636e;font-size:12px;margin:8px 0 0}
"""


def write_report(path: str | Path, sink_path: str | Path, *, evaluation: Evaluation | None = None) -> Path:
    """Write the report of a sink (with an evaluation, when given) to `path`, atomically."""
    return write_page(path, render(overview(sink_path), evaluation))


def write_page(path: str | Path, text: str) -> Path:
    """Write an HTML page to `path` atomically (a reader never sees half a report)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write the report {target}: {exc.strerror or exc}.") from None
    return target


def page(title: str, sub: str, sections: Sequence[str]) -> str:
    """One self-contained HTML document: the title, a subtitle line (plain text), then the sections (HTML)."""
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body><main>",
            f"<h1>{escape(title)}</h1>",
            f'<p class="sub">{escape(sub)} · written {escape(now_iso())}</p>',
            *sections,
            '<p class="note">Self-contained: no scripts, no network. Made by labelstream.</p></main></body></html>',
        ]
    )


def render(view: Overview, evaluation: Evaluation | None = None) -> str:
    """The report as one HTML document."""
    title = f"labelstream report: {Path(view.sink).name}"
    sub = f"{view.sink} · model {view.model} · {'multi-label' if view.multi_label else 'single-label'}" + (
        f" · gold: {evaluation.gold} ({evaluation.gold_column})" if evaluation else ""
    )
    parts = [_cards(view, evaluation)]
    if evaluation is not None:
        parts.append(_confusion(evaluation))
        parts.append(_scores(evaluation))
    parts.append('<div class="grid">')
    parts.append(_distribution(view, evaluation))
    parts.append(_confidence(view, evaluation))
    parts.append("</div>")
    parts.append(_cost_latency(view))
    return page(title, sub, parts)


def card(value: str, what: str) -> str:
    """A figure with a caption, for a row of cards."""
    return f'<div class="card"><b>{escape(value)}</b><span>{escape(what)}</span></div>'


def _cards(view: Overview, ev: Evaluation | None) -> str:
    cost = view.costs.get("standard")
    cards = [card(f"{view.rows:,}", "rows labeled")]
    if ev is not None:
        if ev.multi_label and ev.micro is not None:
            cards += [card(f"{ev.accuracy:.3f}", "exact match"), card(f"{ev.micro.f1:.3f}", "micro-F1")]
        else:
            cards += [card(f"{ev.accuracy:.3f}", "accuracy"), card(f"{ev.kappa or 0:.3f}", "Cohen's kappa")]
        cards += [card(f"{ev.macro_f1:.3f}", "macro-F1"), card(f"{ev.coverage:.1%}", "coverage of gold rows")]
    cards += [
        card(f"${cost:.4f}" if cost is not None else "no price", "cost (standard tier)"),
        card(f"{view.cache_hit_share:.0%}", "prompt tokens from cache"),
    ]
    if view.latency_ms:
        cards.append(card(f"{view.latency_ms['p50']:.0f} ms", "median latency"))
    return f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>'


def shade(share: float, right: bool) -> tuple[str, str]:
    """Background and text colour of a heatmap cell: green on the diagonal, red off it, deeper with the share."""
    to = (26, 127, 55) if right else (207, 34, 46)
    rgb = [round(255 - (255 - c) * share) for c in to]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", "#fff" if share > 0.5 else "#1f2328"


def _confusion(ev: Evaluation) -> str:
    what = "Label co-occurrence" if ev.multi_label else "Confusion matrix"
    head = "".join(f"<th>{escape(c)}</th>" for c in ev.classes)
    rows = []
    for gold, line in zip(ev.classes, ev.matrix, strict=True):
        total = sum(line) or 1
        cells = []
        for predicted, count in zip(ev.classes, line, strict=True):
            background, ink = shade(count / total, gold == predicted)
            tip = f"gold {gold}, predicted {predicted}: {count} ({count / total:.0%} of gold {gold})"
            cells.append(
                f'<td style="background:{background};color:{ink}" data-count="{count}" title="{escape(tip)}">'
                f"{count}</td>"
            )
        rows.append(f"<tr><th>{escape(gold)}</th>{''.join(cells)}</tr>")
    return (
        f'<section id="confusion"><h2>{what}</h2><table class="heatmap"><thead><tr><th>gold \\ predicted</th>{head}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="note">Rows: gold labels; columns: predicted. Shade: share of the row.</p></section>'
    )


def _scores(ev: Evaluation) -> str:
    rows = "".join(
        f"<tr><td>{escape(s.label)}</td><td>{s.precision:.3f}</td><td>{s.recall:.3f}</td><td>{s.f1:.3f}</td>"
        f"<td>{s.support:,}</td><td>{s.predicted:,}</td></tr>"
        for s in ev.scores
    )
    return (
        '<section id="scores"><h2>Per-label scores</h2><table><thead><tr><th>label</th><th>precision</th>'
        f"<th>recall</th><th>F1</th><th>gold rows</th><th>predicted</th></tr></thead><tbody>{rows}</tbody></table>"
        f'<p class="note">{ev.labeled:,} of {ev.gold_rows:,} gold rows labeled; {ev.missing:,} without a label.</p>'
        "</section>"
    )


def _hbars(series: Sequence[tuple[str, Sequence[int]]], names: Sequence[str], colours: Sequence[str]) -> str:
    """Horizontal bars: one group per label, one bar per series."""
    top = max((v for _, values in series for v in values), default=0) or 1
    bar, gap, left, width = 14, 10, 110, 330
    group = bar * len(series) + gap
    height = group * len(names) + 24
    out = [f'<svg width="{left + width + 60}" height="{height}" role="img" viewBox="0 0 {left + width + 60} {height}">']
    for i, name in enumerate(names):
        y = 4 + i * group
        out.append(f'<text x="{left - 8}" y="{y + bar}" text-anchor="end">{escape(name[:16])}</text>')
        for k, (label, values) in enumerate(series):
            value = values[i]
            w = max(1.0, width * value / top) if value else 0.0
            out.append(
                f'<rect class="bar" x="{left}" y="{y + k * bar}" width="{w:.1f}" height="{bar - 2}" '
                f'fill="{colours[k]}">'
                f"<title>{escape(name)}: {value:,} ({escape(label)})</title></rect>"
                f'<text x="{left + w + 4:.1f}" y="{y + k * bar + bar - 4}">{value:,}</text>'
            )
    legend_y = height - 6
    for k, (label, _) in enumerate(series):
        x = left + k * 120
        out.append(f'<rect x="{x}" y="{legend_y - 9}" width="10" height="10" fill="{colours[k]}"></rect>')
        out.append(f'<text x="{x + 14}" y="{legend_y}">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _distribution(view: Overview, ev: Evaluation | None) -> str:
    names = list(view.label_counts)
    series = [("predicted", [view.label_counts[n] for n in names])]
    if ev is not None:
        gold = {s.label: s.support for s in ev.scores}
        series.append(("gold", [gold.get(n, 0) for n in names]))
    chart = _hbars(series, names, ["#0969da", "#bf8700"])
    return f'<section id="labels"><h2>Label distribution</h2>{chart}</section>'


def _vbars(counts: Sequence[int], ticks: Sequence[str], colour: str, *, tip: Sequence[str]) -> str:
    """A histogram: one vertical bar per bin, tick labels under some of them."""
    top = max(counts, default=0) or 1
    width, height, base, step = 420, 180, 150, 420 / max(1, len(counts))
    out = [f'<svg width="{width}" height="{height}" role="img" viewBox="0 0 {width} {height}">']
    out.append(f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#d1d9e0"></line>')
    for i, count in enumerate(counts):
        h = 140 * count / top
        out.append(
            f'<rect class="bar" x="{i * step + 1:.1f}" y="{base - h:.1f}" width="{step - 2:.1f}" height="{h:.1f}" '
            f'fill="{colour}"><title>{escape(tip[i])}: {count:,} rows</title></rect>'
        )
        if ticks[i]:
            out.append(f'<text x="{i * step:.1f}" y="{base + 16}">{escape(ticks[i])}</text>')
    out.append("</svg>")
    return "".join(out)


def _confidence(view: Overview, ev: Evaluation | None) -> str:
    if view.rows == view.without_confidence:
        body = f'<p class="note">No confidence for these rows: {WHY_NO_CONFIDENCE}.</p>'
    else:
        ticks = [f"{i / BINS:.1f}" if i % 4 == 0 else "" for i in range(BINS)]
        tips = [f"confidence {i / BINS:.2f}–{(i + 1) / BINS:.2f}" for i in range(BINS)]
        body = _vbars(view.confidence_bins, ticks, "#8250df", tip=tips)
        body += (
            '<p class="note">Probability of the chosen label, from the reply\'s logprobs; '
            f"{view.without_confidence:,} rows without one.</p>"
        )
    if ev is not None and ev.buckets:
        rows = "".join(
            f"<tr><td>{b.low:.2f}–{b.high:.2f}</td><td>{b.rows:,}</td><td>{b.accuracy:.3f}</td>"
            f"<td>{b.mean_confidence:.3f}</td></tr>"
            for b in ev.buckets
        )
        body += (
            '<table id="buckets"><thead><tr><th>confidence</th><th>rows</th><th>accuracy</th><th>mean confidence</th>'
            f"</tr></thead><tbody>{rows}</tbody></table>"
        )
    return f'<section id="confidence"><h2>Confidence</h2>{body}</section>'


def _cost_latency(view: Overview) -> str:
    priced = view.costs.get("standard") is not None

    def usd(value: float | None) -> str:
        return f"${value:.4f}" if value is not None else "not offered for this model" if priced else "no price"

    rows = [
        ("prompt tokens", f"{view.prompt_tokens:,} ({view.cache_hit_share:.0%} from the prompt cache)"),
        ("completion tokens", f"{view.completion_tokens:,}"),
        ("cost, standard (online)", usd(view.costs.get("standard"))),
        ("the same at batch prices", usd(view.costs.get("batch"))),
        ("the same at flex prices", usd(view.costs.get("flex"))),
    ]
    if view.rows:
        per = view.costs.get("standard")
        rows.append(("cost per 1,000 rows", usd(None if per is None else per * 1000 / view.rows)))
    if view.copies:
        saved = f", {usd(view.copy_saving)} saved" if view.copy_saving is not None else ""
        rows.append(("copies of an identical text", f"{view.copies:,} rows without a request{saved}"))
    for key in ("p50", "p90", "p99", "max"):
        if key in view.latency_ms:
            rows.append((f"latency {key}", f"{view.latency_ms[key]:,.0f} ms"))
    run = view.last_run or {}
    if run.get("elapsed_s") is not None and run.get("labeled"):
        rows.append(
            ("last run", f"{run.get('state')}: {short_number(run['labeled'])} rows in "
             f"{short_duration(run.get('elapsed_s'))} ({run.get('rows_per_s')} rows/s)")
        )  # fmt: skip
    elif run.get("state"):
        rows.append(("last run", f"{run.get('state')}: nothing left to label"))
    table = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    chart = ""
    if view.latency_bins:
        counts = [c for _, c in view.latency_bins]
        lows = [0.0, *(edge for edge, _ in view.latency_bins[:-1])]
        ticks = [f"{low:,.0f}" if i % 3 == 0 else "" for i, low in enumerate(lows)]
        tips = [f"{low:,.0f}–{edge:,.0f} ms" for low, (edge, _) in zip(lows, view.latency_bins, strict=True)]
        chart = f"<div><h2>Latency (ms)</h2>{_vbars(counts, ticks, '#1a7f37', tip=tips)}</div>"
    return (
        f'<section id="cost"><div class="grid"><div><h2>Cost and tokens</h2><table>{table}</table>'
        f'<p class="note">{escape(view.prices)}</p></div>{chart}</div></section>'
    )
