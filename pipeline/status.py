"""`labelstream status OUT`: what a sink holds, what failed and is still unlabeled, and how a run is going."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from pipeline.engines.batch.ledger import Ledger
from pipeline.errors import SinkError, UsageError
from pipeline.sinks import open_sink
from pipeline.stats import short_duration


def sink_status(path: Path) -> dict[str, Any]:
    """Counts and samples for a sink, read without changing anything."""
    sink = open_sink(path)
    if not sink.exists():
        raise SinkError(f"{path} does not exist yet; run `labelstream label --output {path}` first.")
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
    progress = _read_json(sink.meta.progress_path)
    manifest = sink.meta.read_manifest()
    total = len(done) + len(pending)
    identity = manifest.identity if manifest else None
    book = Ledger(sink.meta)
    live = book.live
    return {
        "output": str(path),
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


def render_status(report: dict[str, Any]) -> str:
    """Human form of `sink_status`."""
    lines = [
        f"{report['output']}: {report['labeled']:,} labeled, {report['failed_unlabeled']:,} failed and not yet "
        f"labeled ({report['failure_rate']:.1%})",
        f"  model {report['model']}, prompt {report['prompt']}, labels {report['labels']}, {report['runs']} runs",
    ]
    progress = report.get("progress")
    if progress:
        running = progress.get("state") in {"running", "stopping"}
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
