"""`labelstream batch status` and `batch cancel`: a sink's batches as the ledger and the provider see them.

Neither takes the sink's lock or writes the ledger, so both work while a run is waiting on the batches:
that run notices a cancelled batch on its next look and collects what it finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.engines.batch.api import BatchApi
from pipeline.engines.batch.ledger import CREATING, ENDED, SUBMITTED, Ledger, Submission
from pipeline.engines.batch.submit import counts_of, find_batch
from pipeline.errors import SinkError
from pipeline.sinks import meta_dir_for, open_meta
from pipeline.sinks.storage import object_uri


def _ledger(output: Path) -> Ledger:
    if object_uri(output) is None and not meta_dir_for(output).exists():
        raise SinkError(f"{output} has no side files yet; run `labelstream label --output {output}` first.")
    return Ledger(open_meta(output))


async def batch_status(output: Path, api: BatchApi | None) -> dict[str, Any]:
    """Every submission of a sink; with `api`, the live ones as the provider sees them now."""
    ledger = _ledger(output)
    if api is not None:
        ledger.check_endpoint(api.where, str(output))
    subs = []
    for sub in ledger.submissions:
        entry = _entry(sub)
        if api is not None and sub.state == SUBMITTED and sub.batch_id:
            batch = await api.retrieve(sub.batch_id)
            entry["status"], entry["counts"] = batch.status, counts_of(batch)
            entry["ended_waiting"] = batch.status in ENDED  # collected by the next `label` run
        subs.append(entry)
    live = [e for e in subs if e["state"] not in ("collected", "prepared")]  # prepared: never uploaded
    return {
        "output": str(output),
        "checked_with_provider": api is not None,
        "submissions": subs,
        "live": len(live),
        "live_rows": sum(e["requests"] for e in live),
    }


def _entry(sub: Submission) -> dict[str, Any]:
    return {
        "id": sub.id,
        "state": sub.state,
        "batch_id": sub.batch_id,
        "input_file_id": sub.input_file_id,
        "status": sub.status,
        "requests": sub.requests,
        "counts": dict(sub.counts),
        "outcome": dict(sub.outcome),
        "errors": list(sub.errors),
        "prepared_at": sub.prepared_at,
    }


def render_batch_status(report: dict[str, Any]) -> str:
    """Human form of `batch_status`."""
    subs = report["submissions"]
    if not subs:
        return f"{report['output']}: no batches yet (label it with --engine batch or auto)."
    lines = [
        f"{report['output']}: {len(subs)} batches, {report['live']} not yet collected "
        f"({report['live_rows']:,} rows)" + ("" if report["checked_with_provider"] else " (ledger only)")
    ]
    for e in subs:
        counts = e["counts"]
        done = f" {counts.get('completed', 0):,}/{counts.get('total', e['requests']):,} done" if counts else ""
        failed = f", {counts['failed']:,} failed" if counts.get("failed") else ""
        outcome = e["outcome"]
        result = (
            f" → {outcome.get('labeled', 0):,} labeled, {outcome.get('failed', 0):,} failed, "
            f"{outcome.get('unfinished', 0):,} unprocessed"
            if outcome
            else ""
        )
        status = e["status"] or "-"
        lines.append(f"  {e['id']} {e['batch_id'] or '(no batch yet)'}: {e['state']}, {status}{done}{failed}{result}")
        if e["state"] == "prepared":
            lines.append("    never uploaded: nothing is at the provider; the next run plans its rows afresh")
        if e.get("ended_waiting"):
            lines.append("    ended: the next `labelstream label ... --engine batch` run collects it")
        lines.extend(f"    error: {text}" for text in e["errors"][:3])
    return "\n".join(lines)


async def cancel_batches(output: Path, api: BatchApi) -> list[tuple[str, str]]:
    """Ask the provider to cancel every batch of the sink still running; (batch id, its status now) for each.

    A batch whose creation a crash left unrecorded is found by its submission id and cancelled too. What the
    batches finished is kept: the next `label` run collects it, and sends the rest again.
    """
    ledger = _ledger(output)
    ledger.check_endpoint(api.where, str(output))
    done: list[tuple[str, str]] = []
    for sub in ledger.live:
        batch_id = sub.batch_id
        if sub.state == CREATING:
            found = await find_batch(api, sub, settle=0)
            batch_id = found.id if found is not None else None
        if batch_id is None:
            continue
        batch = await api.retrieve(batch_id)
        if batch.status not in ENDED and batch.status != "cancelling":
            batch = await api.cancel(batch_id)
        done.append((batch_id, batch.status))
    return done
