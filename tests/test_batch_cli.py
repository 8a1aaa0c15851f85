"""The batch commands and engine flags through the real CLI: prepare → run elsewhere → ingest, status, cancel, flex."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from .helpers import cli, dead_letters, ids_once, label_args, ledger, reviews, sink_ids, write_csv


def run_like_vllm(sim: Any, requests: Path, results: Path, *, fail: str, spoil: str) -> None:
    """Answer a request file the way vLLM's run_batch does: one result line per request, in input order, with
    `error` per line (a plain string for a request it could not serve). Replies come from the simulator."""
    url = urlparse(sim.base_url)
    lines = []
    for n, raw in enumerate(requests.read_bytes().splitlines()):
        request = json.loads(raw)
        custom_id = request["custom_id"]
        if custom_id == fail:
            response: dict[str, Any] = {"status_code": 400, "request_id": f"vllm-batch-{n}"}
            lines.append({"id": f"vllm-{n}", "custom_id": custom_id, "response": response, "error": "prompt too long"})
            continue
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(request["body"]),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(conn.getresponse().read())
        conn.close()
        if custom_id == spoil:
            body["choices"][0]["message"]["content"] = '{"label": "ecstatic"}'
        response = {"status_code": 200, "request_id": f"vllm-batch-{n}", "body": body}
        lines.append({"id": f"vllm-{n}", "custom_id": custom_id, "response": response, "error": None})
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.slow
def test_prepare_run_elsewhere_ingest_round_trip_exactly_once(sim: Any, tmp_path: Path) -> None:
    """prepare writes request files; results in vLLM's format merge in once; a second ingest adds nothing."""
    rows = reviews(45)
    source = write_csv(tmp_path / "in.csv", rows)
    out, folder = tmp_path / "out.parquet", tmp_path / "requests"
    config = str(Path("configs") / "sentiment.toml")
    prepared = cli("batch", "prepare", "--input", str(source), "--config", config, "--to", str(folder),
                   "--output", str(out), "--batch-size", "20")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    assert "wrote 45 requests in 3 files" in prepared.stdout and "batch ingest" in prepared.stdout
    files = sorted(folder.glob("requests-*.jsonl"))
    assert [len(f.read_bytes().splitlines()) for f in files] == [20, 20, 5]
    first = json.loads(files[0].read_bytes().splitlines()[0])
    assert first["url"] == "/v1/chat/completions" and first["body"]["response_format"]["type"] == "json_schema"
    results = []
    for n, path in enumerate(files, 1):
        results.append(folder / f"results-{n:04d}.jsonl")
        run_like_vllm(sim, path, results[-1], fail="r00003", spoil="r00010")
    ingest = cli("batch", "ingest", str(out), *map(str, results), "--input", str(source), "--config", config)
    assert ingest.returncode == 1, ingest.stderr  # two rows dead-lettered
    assert "43 rows labeled, 2 failed" in ingest.stdout
    assert {d["id"]: d["kind"] for d in dead_letters(out)} == {"r00003": "bad_request", "r00010": "invalid_label"}
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows if r[0] not in {"r00003", "r00010"})
    again = cli("batch", "ingest", str(out), *map(str, results))  # input and task file from the sink's manifest
    assert again.returncode == 1 and "0 rows labeled" in again.stdout and "43 already in the sink" in again.stdout
    assert len(sink_ids(out)) == 43
    left = cli("batch", "prepare", "--input", str(source), "--config", config, "--to", str(tmp_path / "left"),
               "--output", str(out))  # fmt: skip
    # The row vLLM refused (400) would be refused again: only the one with an invalid reply is written.
    assert left.returncode == 0 and "wrote 1 requests in 1 files" in left.stdout
    assert "also left out 1 rows whose very request a server refused before" in left.stdout
    refused = cli("batch", "prepare", "--input", str(source), "--config", config, "--to", str(folder))
    assert refused.returncode == 2 and "already holds request files" in refused.stderr


@pytest.mark.slow
def test_label_engine_batch_logs_progress_and_status_shows_the_batches(sim: Any, tmp_path: Path) -> None:
    """`label --engine batch` logs batch states and request counts; `status` and `batch status` show the batches."""
    sim.configure(batch_seconds=0.5)
    source = write_csv(tmp_path / "in.csv", reviews(120))
    out = tmp_path / "out.jsonl"
    result = cli(*label_args(sim, source, out, "--engine", "batch", "--batch-size", "50", "--poll-interval", "0.05"))
    assert result.returncode == 0, result.stderr
    assert "labelstream: batches:" in result.stderr and "requests " in result.stderr and "ETA" in result.stderr
    assert "labelstream done: 120 labeled" in result.stderr and "at batch prices" in result.stderr
    assert len(ids_once(out)) == 120
    status = cli("batch", "status", str(out), "--base-url", sim.base_url)
    assert status.returncode == 0 and "3 batches, 0 not yet collected" in status.stdout
    assert status.stdout.count("collected, completed") == 3
    overall = cli("status", str(out))
    assert "batches: 3" in overall.stdout


@pytest.mark.slow
def test_status_and_cancel_while_batches_run(sim: Any, tmp_path: Path) -> None:
    """After --no-wait, batch status shows them running; batch cancel cancels them; a re-run finishes the job."""
    sim.configure(batch_seconds=3600)
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.jsonl"
    sent = cli(*label_args(sim, source, out, "--engine", "batch", "--no-wait"))
    assert sent.returncode == 0, sent.stderr
    assert "labelstream submitted" in sent.stderr and "batch status" in sent.stderr
    status = cli("batch", "status", str(out), "--base-url", sim.base_url, "--json")
    report = json.loads(status.stdout)
    assert report["live"] == 1 and report["live_rows"] == 30
    assert report["submissions"][0]["status"] == "in_progress"
    assert "running batches hold 30 rows" in cli("status", str(out)).stdout
    cancelled = cli("batch", "cancel", str(out), "--base-url", sim.base_url)
    assert cancelled.returncode == 0 and ": cancelled" in cancelled.stdout
    sim.configure(batch_seconds=0)
    done = cli(*label_args(sim, source, out, "--engine", "batch", "--poll-interval", "0.05"))
    assert done.returncode == 0, done.stderr
    assert len(ids_once(out)) == 30 and [s["state"] for s in ledger(out)["submissions"]] == ["collected"] * 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no-wait"], "--engine batch or auto"),
        (["--retry-refused"], "--engine batch or auto"),
        (["--engine", "batch", "--service-tier", "flex"], "--service-tier applies to online requests"),
        (["--engine", "batch", "--batch-size", "60000"], "at most 50,000"),
    ],
)
def test_engine_flags_that_contradict_each_other_are_usage_errors(
    sim: Any, tmp_path: Path, flags: list[str], message: str
) -> None:
    """Engine flags that make no sense together exit 2 with a message saying what to do."""
    source = write_csv(tmp_path / "in.csv", reviews(3))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", *flags))
    assert result.returncode == 2 and message in result.stderr


def test_dry_run_prices_a_batch_run_at_batch_prices(sim: Any, tmp_path: Path) -> None:
    """--dry-run --engine batch shows the cost at batch prices beside the standard one and sends nothing."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--engine", "batch", "--dry-run"))
    assert result.returncode == 0, result.stderr
    costs = re.search(r"cost: standard \$([0-9.]+), batch \$([0-9.]+)", result.stdout)
    assert costs is not None, result.stdout
    assert float(costs.group(2)) == pytest.approx(float(costs.group(1)) / 2, abs=2e-4)
    assert sim.batch_summary()["files"] == 0
