"""What a sink holds, summed up for a report: label distribution, confidence histogram, tokens, cost, latency."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.api.pricing import TIERS, load_prices
from pipeline.errors import SinkError
from pipeline.sinks import open_sink
from pipeline.sinks.progress_file import read_progress

BINS: Final = 20  # confidence histogram: 0.00-0.05, ..., 0.95-1.00
_COLUMNS: Final = (
    "label", "confidence", "prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms", "model", "copied_from"
)  # fmt: skip


@dataclass(slots=True)
class Overview:
    """The figures of one sink (all its runs)."""

    sink: str
    model: str | None
    multi_label: bool
    labels: list[str]
    rows: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)
    confidence_bins: list[int] = field(default_factory=lambda: [0] * BINS)
    without_confidence: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    costs: dict[str, float | None] = field(default_factory=dict)
    prices: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p95, p99, max, mean
    latency_bins: list[tuple[float, int]] = field(default_factory=list)  # (upper edge in ms, rows)
    last_run: dict[str, Any] | None = None
    copies: int = 0  # rows that copied the record of an identical text (dedupe): no request, no cost

    @property
    def copy_saving(self) -> float | None:
        """USD the copies saved: the sink's mean standard cost per request, times the copies."""
        cost, sent = self.costs.get("standard"), self.rows - self.copies
        return None if cost is None or not sent else cost * self.copies / sent

    @property
    def cache_hit_share(self) -> float:
        """Share of prompt tokens served from the provider's prompt cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def overview(sink_path: str | Path) -> Overview:
    """Read a sink once and sum it up."""
    path = Path(sink_path)
    sink = open_sink(path)
    manifest = sink.meta.read_manifest()
    if not sink.exists() or manifest is None or manifest.identity is None:
        raise SinkError(f"{path} is not a labelstream sink with a manifest; label something into it first.")
    identity = manifest.identity
    result = Overview(str(path), identity.model, identity.multi_label, list(identity.labels))
    result.label_counts = dict.fromkeys(identity.labels, 0)
    latencies = array("f")
    models: dict[str, int] = {}
    for item in sink.iter_records(columns=list(_COLUMNS)):
        result.rows += 1
        label = item.get("label")
        for name in label if isinstance(label, list) else [label]:
            result.label_counts[str(name)] = result.label_counts.get(str(name), 0) + 1
        confidence = item.get("confidence")
        if isinstance(confidence, int | float):
            result.confidence_bins[min(BINS - 1, int(confidence * BINS))] += 1
        else:
            result.without_confidence += 1
        result.prompt_tokens += item.get("prompt_tokens") or 0
        result.completion_tokens += item.get("completion_tokens") or 0
        result.cached_tokens += item.get("cached_tokens") or 0
        if item.get("copied_from") is not None:
            result.copies += 1  # made without a request: no latency of its own
        elif isinstance(item.get("latency_ms"), int | float):
            latencies.append(item["latency_ms"])
        model = str(item.get("model") or identity.model)
        models[model] = models.get(model, 0) + 1
    _price(result, max(models, key=models.__getitem__) if models else identity.model)
    _latency(result, sorted(latencies))
    result.last_run = read_progress(sink.meta.progress_path)
    return result


def _price(result: Overview, model: str) -> None:
    table = load_prices()
    price = table.price_of(model)
    result.prices = table.provenance
    for tier in TIERS:
        tokens = (result.prompt_tokens, result.completion_tokens)
        result.costs[tier] = (
            None if price is None else price.cost(*tokens, tier=tier, cached_tokens=result.cached_tokens)
        )


def _latency(result: Overview, ordered: list[float]) -> None:
    if not ordered:
        return
    n = len(ordered)
    result.latency_ms = {
        "p50": ordered[n // 2],
        "p90": ordered[min(n - 1, n * 9 // 10)],
        "p95": ordered[min(n - 1, n * 95 // 100)],
        "p99": ordered[min(n - 1, n * 99 // 100)],
        "max": ordered[-1],
        "mean": sum(ordered) / n,
    }
    # Twelve equal bins from 0 to the 99th percentile, plus one for the slow tail.
    top = max(1.0, result.latency_ms["p99"])
    edges = [top * (i + 1) / 12 for i in range(12)]
    counts = [0] * 13
    for value in ordered:
        counts[next((i for i, edge in enumerate(edges) if value <= edge), 12)] += 1
    result.latency_bins = [(edge, counts[i]) for i, edge in enumerate(edges)]
    if counts[12]:
        result.latency_bins.append((ordered[-1], counts[12]))
