"""`labelstream status OUT`: what a sink holds, what failed and is still unlabeled, and how a run is going.

A sharded output is reported as one, with a line per shard: done, running, stale (its progress file says
running, but its process is gone or silent), stopped, or not started.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.engines.batch.ledger import Ledger
from pipeline.errors import SinkError, UsageError
from pipeline.sinks import Sink, discover, open_shards, open_sink
from pipeline.sinks.progress_file import LIVE, RunState, read_progress, run_state
from pipeline.stats import short_duration


def sink_status(path: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """Counts and samples for a sink (all shards of a sharded one), read without changing anything."""
    layout = discover(path)
    sinks = open_shards(path, layout)
    if not any(sink.exists() for sink in sinks):
        raise SinkError(f"{path} does not exist yet; run `labelstream label --output {path}` first.")
    reports = [_one(sink, now or datetime.now(UTC)) for sink in sinks]
    if not layout.sharded:
        report = reports[0]
        report.pop("state")
        report.pop("shard")
        return report
    return _combined(path, reports)


def _one(sink: Sink, now: datetime) -> dict[str, Any]:
    if not sink.exists():
        return {"shard": sink.shard.label if sink.shard else None, "state": RunState.NOT_STARTED.value, "labeled": 0}
    done = sink.load_done(repair=False)
    pending: dict[str, dict[str, Any]] = {}
    for letter in sink.meta.read_dead_letters():
        row_id = str(letter.get("id"))
        if row_id in done:
            pending.pop(row_id, None)
        else:
            pending[row_id] = letter  # the latest failure of a row wins
    kinds: dict[str, int] = {}
    for letter in pending.values():
        kind = str(letter.get("kind"))
        kinds[kind] = kinds.get(kind, 0) + 1
    recent = sorted(pending.values(), key=lambda x: str(x.get("failed_at")), reverse=True)[:5]
    progress = read_progress(sink.meta.progress_path)
    manifest = sink.meta.read_manifest()
    total = len(done) + len(pending)
    identity = manifest.identity if manifest else None
    book = Ledger(sink.meta)
    live = book.held  # a request file never uploaded holds no rows at the provider
    return {
        "output": str(sink.output),
        "shard": sink.shard.label if sink.shard else None,
        "state": run_state(progress, now),
        "labeled": len(done),
        "failed_unlabeled": len(pending),
        "failure_rate": round(len(pending) / total, 4) if total else 0.0,
        "failures_by_kind": kinds,
        "recent_failures": [
            {k: letter.get(k) for k in ("id", "kind", "message", "attempts", "status", "failed_at")}
            for letter in recent
        ],
        "model": identity.model if identity else None,
        "prompt": identity.prompt if identity else None,
        "labels": list(identity.labels) if identity else None,
        "runs": len(manifest.runs) if manifest else 0,
        "progress": progress,
        "batches": {"total": len(book.submissions), "live": len(live), "live_rows": sum(s.requests for s in live)},
        "notes": sink.notes,
    }


def _combined(path: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for N shards: totals, and each shard's counts and state."""
    started = [r for r in reports if r["state"] != RunState.NOT_STARTED]
    labeled = sum(r["labeled"] for r in started)
    failed = sum(r["failed_unlabeled"] for r in started)
    kinds: dict[str, int] = {}
    for report in started:
        for kind, n in report["failures_by_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    recent = sorted(
        (f for r in started for f in r["recent_failures"]), key=lambda x: str(x.get("failed_at")), reverse=True
    )
    first = next((r for r in started if r["model"]), started[0] if started else {})
    running = [r for r in reports if r["state"] == RunState.RUNNING]
    etas = [r["progress"].get("eta_s") for r in running if r.get("progress")]
    by_state: dict[str, list[str]] = {}
    for report in reports:
        by_state.setdefault(report["state"], []).append(report["shard"])
    shards = []
    for r in reports:
        progress = r.get("progress") or {}
        shards.append(
            {
                "shard": r["shard"],
                "state": r["state"],
                "labeled": r["labeled"],
                "failed_unlabeled": r.get("failed_unlabeled", 0),
                "rows_per_s": progress.get("rows_per_s") if r["state"] == RunState.RUNNING else None,
                "eta_s": progress.get("eta_s") if r["state"] == RunState.RUNNING else None,
                "updated_at": progress.get("updated_at"),
            }
        )
    total = labeled + failed
    return {
        "output": str(path),
        "labeled": labeled,
        "failed_unlabeled": failed,
        "failure_rate": round(failed / total, 4) if total else 0.0,
        "failures_by_kind": kinds,
        "recent_failures": recent[:5],
        "model": first.get("model"),
        "prompt": first.get("prompt"),
        "labels": first.get("labels"),
        "runs": sum(r["runs"] for r in started),
        "progress": None,
        "notes": [note for r in started for note in r["notes"]],
        "shard_count": len(reports),
        "shards": shards,
        "shards_by_state": by_state,
        "rows_per_s": round(sum(s["rows_per_s"] or 0 for s in shards), 2),
        # The shards run side by side: the output is done when the slowest running shard is.
        "eta_s": max((e for e in etas if isinstance(e, int | float)), default=None),
    }


def render_status(report: dict[str, Any]) -> str:
    """Human form of `sink_status`."""
    lines = [
        f"{report['output']}: {report['labeled']:,} labeled, {report['failed_unlabeled']:,} failed and not yet "
        f"labeled ({report['failure_rate']:.1%})",
        f"  model {report['model']}, prompt {report['prompt']}, labels {report['labels']}, {report['runs']} runs"
        if report["model"] is not None
        else "  no manifest: written outside `labelstream label` (e.g. by pipeline.ray); the records name the model",
    ]
    if "shards" in report:
        lines.extend(_render_shards(report))
    progress = report.get("progress")
    if progress:
        running = progress.get("state") in LIVE
        eta = f", ETA {short_duration(progress.get('eta_s'))}" if running else ""
        lines.append(
            f"  last run: {progress.get('state')} at {progress.get('updated_at')}, {progress.get('labeled')} labeled, "
            f"{progress.get('failed')} failed, {progress.get('rows_per_s')} rows/s{eta}"
        )
    batches = report.get("batches") or {}
    if batches.get("total"):
        held = (
            f"running batches hold {batches['live_rows']:,} rows (see labelstream batch status {report['output']})"
            if batches["live"]
            else "none running"
        )
        lines.append(f"  batches: {batches['total']}, {held}")
    for kind, count in sorted(report["failures_by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind}: {count:,}")
    for letter in report["recent_failures"]:
        lines.append(f"    {letter['id']}: {letter['kind']}: {str(letter['message'])[:140]}")
    return "\n".join(lines)


def _render_shards(report: dict[str, Any]) -> list[str]:
    states = ", ".join(
        f"{len(shards)} {state} ({' '.join(s.split('/')[0] for s in shards)})"
        for state, shards in sorted(report["shards_by_state"].items())
    )
    lines = [f"  {report['shard_count']} shards: {states}"]
    if report["eta_s"] is not None:
        left = [
            s
            for s, items in report["shards_by_state"].items()
            if s not in {RunState.DONE, RunState.RUNNING}
            for _ in items
        ]
        caveat = f" (and {len(left)} shards not running)" if left else ""
        lines.append(f"  running at {report['rows_per_s']} rows/s, ETA {short_duration(report['eta_s'])}{caveat}")
    for shard in report["shards"]:
        speed = f", {shard['rows_per_s']} rows/s, ETA {short_duration(shard['eta_s'])}" if shard["rows_per_s"] else ""
        lines.append(
            f"    shard {shard['shard']}: {shard['state']}, {shard['labeled']:,} labeled, "
            f"{shard['failed_unlabeled']:,} failed{speed}"
        )
    return lines


def ensure_finished(path: Path) -> None:
    """Raise UsageError while a run still writes the sink (it holds the lock): a report is for a finished run."""
    sink = open_sink(path)
    if not sink.exists():
        raise SinkError(f"{path} does not exist yet; run `labelstream label --output {path}` first.")
    try:
        sink.meta.lock()
    except SinkError as exc:
        raise UsageError(f"{exc.message} A report describes a finished run: write it when the run has ended.") from None
    sink.meta.unlock()
