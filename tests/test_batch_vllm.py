"""Batch results and request files as vLLM `run_batch` reads and writes them, and what a failed or refused batch
leaves behind: error text kept in every shape, a run_batch command that works, no rows said to be at the provider
that never got there, and requests refused as sent not sent again unchanged."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.engines.batch.ingest import read_result
from pipeline.engines.batch.ledger import Ledger, Submission
from pipeline.errors import BatchError
from pipeline.sinks import SinkMeta, open_sink
from pipeline.task.config import load_config
from pipeline.task.prompt import Prompt

from .helpers import ROOT, cli, dead_letters, label_batch, ledger, reviews, write_csv
from .test_batch_cli import run_like_vllm

PROMPT = Prompt(load_config(ROOT / "configs" / "sentiment.toml"))
CONTEXT = "This model's maximum context length is 2048 tokens. However, you requested 9000 tokens."


@pytest.mark.parametrize(
    "line",
    [
        {"response": {"status_code": 400, "body": None},
         "error": {"error": {"message": CONTEXT, "type": "BadRequestError", "param": None, "code": 400}}},
        {"response": {"status_code": 400, "body": None},
         "error": {"object": "error", "message": CONTEXT, "type": "BadRequestError", "param": None, "code": 400}},
        {"response": {"status_code": 400, "request_id": "r",
                      "body": {"error": {"message": CONTEXT, "type": "invalid_request_error", "param": "messages",
                                         "code": "context_length_exceeded"}}},
         "error": None},
        {"response": {"status_code": 400, "request_id": "vllm-batch-1"}, "error": CONTEXT},
        {"response": None, "error": {"code": "invalid_request", "message": CONTEXT}},
    ],
    ids=["vllm_0_32_nested", "vllm_older_flat", "openai_body", "vllm_string", "openai_error"],
)  # fmt: skip
def test_every_error_line_shape_keeps_its_message(line: dict[str, Any]) -> None:
    """Whichever shape a runner writes an error line in, the dead letter keeps the server's message."""
    found = read_result(PROMPT, json.dumps({"id": "x", "custom_id": "r1", **line}).encode())
    assert found is not None
    custom_id, outcome = found
    assert custom_id == "r1" and outcome.reply is None and CONTEXT in outcome.message
    assert outcome.message.count(CONTEXT) == 1 and "HTTP 400 :" not in outcome.message


def test_the_batch_engine_keeps_the_message_of_vllm_shaped_error_lines(sim: Any, tmp_path: Path) -> None:
    """Error lines in vLLM run_batch's shape (body null, message under error.error) reach the dead letters whole."""
    sim.configure(server="vllm", batch_seconds=0)
    sim.script([{"kind": "status", "status": 400, "match": "review 2: fine", "message": CONTEXT,
                 "code": "context_length_exceeded"}])  # fmt: skip
    source = write_csv(tmp_path / "in.csv", reviews(6))
    out = tmp_path / "out.jsonl"
    summary = label_batch(sim, source, out)
    assert (summary.labeled, summary.failed) == (5, 1)
    (letter,) = dead_letters(out)
    assert letter["id"] == "r00002" and letter["status"] == 400 and CONTEXT in letter["message"]


def prepare(source: Path, folder: Path, *extra: str) -> Any:
    """`labelstream batch prepare` of the sentiment task (model gpt-4o-mini) into `folder`."""
    config = str(ROOT / "configs" / "sentiment.toml")
    return cli("batch", "prepare", "--input", str(source), "--config", config, "--to", str(folder), *extra)


def test_prepare_prints_a_run_batch_command_that_loads_a_model_and_serves_the_alias(tmp_path: Path) -> None:
    """The printed run_batch command passes weights to --model (a placeholder, or --model-path) and the name the
    requests ask for to --served-model-name: given the alias as --model, vLLM would try to download it."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    done = prepare(source, tmp_path / "req")
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "vllm.entrypoints.openai.run_batch" in x)
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.run_batch"]
    options = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert options == {"-i": str(tmp_path / "req" / "requests-0001.jsonl"),
                       "-o": str(tmp_path / "req" / "results-0001.jsonl"),
                       "--model": "/path/to/model", "--served-model-name": "gpt-4o-mini"}  # fmt: skip
    assert "put the model's folder" in done.stdout
    given = prepare(source, tmp_path / "req2", "--model-path", "/models/tiny llama")
    assert "--model '/models/tiny llama' --served-model-name gpt-4o-mini" in given.stdout
    assert "put the model's folder" not in given.stdout


def test_the_printed_loop_runs_every_request_file_into_its_results_file(tmp_path: Path) -> None:
    """With several request files, the printed shell loop runs each one into the results file ingest expects."""
    source = write_csv(tmp_path / "in.csv", reviews(45))
    folder = tmp_path / "my requests"
    done = prepare(source, folder, "--batch-size", "20", "--model-path", "/m")
    assert done.returncode == 0, done.stderr
    loop = next(x for x in done.stdout.splitlines() if "vllm.entrypoints.openai.run_batch" in x).strip()
    fake = tmp_path / "bin"
    fake.mkdir()
    # A stand-in for python: writes the arguments it got into the file named after -o.
    script = '#!/bin/sh\nfor a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\necho "$*" > "$out"\n'
    (fake / "python").write_text(script)
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", loop], check=True, env=env, timeout=30)
    made = sorted(p.name for p in folder.glob("results-*.jsonl"))
    assert made == ["results-0001.jsonl", "results-0002.jsonl", "results-0003.jsonl"]
    assert all("--model /m --served-model-name gpt-4o-mini" in (folder / name).read_text() for name in made)


def test_a_batch_run_whose_upload_fails_leaves_no_rows_said_to_be_at_the_provider(sim: Any, tmp_path: Path) -> None:
    """An --engine batch run against a server without a Files API (vLLM) leaves no submission behind: status
    shows no rows held, and the `batch prepare` the error recommends writes every row."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    out = tmp_path / "out.jsonl"

    class Elsewhere:
        base_url = sim.base_url + "/nothing-here"

    with pytest.raises(BatchError, match="batch prepare"):
        label_batch(Elsewhere(), source, out)
    assert ledger(out)["submissions"] == []
    assert not list((tmp_path / "out.jsonl.meta" / "batches").iterdir())
    status = cli("status", str(out))
    assert "running batches hold" not in status.stdout and "batches:" not in status.stdout
    prepared = prepare(source, tmp_path / "req", "--output", str(out))
    assert "wrote 5 requests in 1 files" in prepared.stdout and "0 in its running batches" in prepared.stdout


def test_a_request_file_a_crash_left_unuploaded_is_reported_as_such_and_planned_afresh(
    sim: Any, tmp_path: Path
) -> None:
    """A submission left `prepared` (killed before its upload was recorded) holds no rows: status and batch status
    say nothing is at the provider, and the next run plans its rows afresh into one batch, each row once."""
    sim.configure(batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(8))
    out = tmp_path / "out.jsonl"
    label_batch(sim, source, out, max_rows=2)  # makes the sink and its ledger
    book = Ledger(SinkMeta(out))
    book.ensure()
    sub = Submission(id="sub_leftover", model="gpt-4o-mini", requests=3, bytes=10)
    book.requests_path(sub.id).write_text("{}\n")
    book.rows_path(sub.id).write_text("".join(json.dumps({"id": f"r0000{i}", "line": i, "text": "x"}) + "\n"
                                              for i in range(2, 5)))  # fmt: skip
    book.add(sub)
    assert "running batches hold" not in cli("status", str(out)).stdout
    offline = cli("batch", "status", str(out), "--offline")
    assert "0 not yet collected (0 rows)" in offline.stdout and "never uploaded" in offline.stdout
    before = sim.batch_summary()["submissions"]
    summary = label_batch(sim, source, out)
    assert (summary.labeled, summary.batches, summary.pending) == (6, 1, 0)
    after = sim.batch_summary()["submissions"]
    sent = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    assert sent == {f"r0000{i}": 1 for i in range(2, 8)}
    assert [s["id"] for s in ledger(out)["submissions"]].count("sub_leftover") == 0


def test_a_request_refused_as_sent_gets_advice_and_is_not_sent_again_unchanged(sim: Any, tmp_path: Path) -> None:
    """A context-length 400 in a batch is dead-lettered as context_length with advice on what to change, not on
    re-running; the next run leaves that row out (exit 1, saying why) until its request changes, then sends it;
    --retry-refused sends it anyway (for a server that changed)."""
    sim.configure(batch_seconds=0, server="vllm")
    sim.script([{"kind": "status", "status": 400, "match": "review 2: fine", "message": CONTEXT, "count": -1}])
    rows = reviews(6)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    first = label_batch(sim, source, out)
    assert (first.labeled, first.failed, first.refused, first.exit_code) == (5, 1, 1, 1)
    assert [(d["id"], d["kind"], bool(d.get("request_sha"))) for d in dead_letters(out)] == [
        ("r00002", "context_length", True)
    ]
    shown = first.render()
    assert "1 rows were refused as sent" in shown and "max_chars" in shown and "longer context" in shown
    assert "to retry" not in shown and "re-run" not in shown.split("dead letters:")[-1]
    again = label_batch(sim, source, out)
    assert (again.labeled, again.failed, again.refused_before, again.batches, again.exit_code) == (0, 0, 1, 0, 1)
    assert "1 rows left out, refused as sent before" in again.render()
    assert sim.batch_summary()["submissions"]["r00002"] == 1
    retried = label_batch(sim, source, out, retry_refused=True)  # e.g. after the server's context grew
    assert (retried.failed, retried.refused_before, sim.batch_summary()["submissions"]["r00002"]) == (1, 0, 2)
    write_csv(source, [(i, lang, "review 2: shorter" if i == "r00002" else text) for i, lang, text in rows])
    changed = label_batch(sim, source, out)
    assert (changed.labeled, changed.refused_before, changed.exit_code) == (1, 0, 0)
    assert sim.batch_summary()["submissions"]["r00002"] == 3


def test_ingest_advises_on_a_context_length_error_and_prepare_then_leaves_the_row_out(tmp_path: Path) -> None:
    """batch ingest of vLLM's context-length error says what to change; the next batch prepare leaves the row out
    and says why (--retry-refused writes it too), while a row that merely failed (an invalid reply) is written
    again."""
    source = write_csv(tmp_path / "in.csv", reviews(3))
    out = tmp_path / "out.jsonl"
    assert prepare(source, tmp_path / "req", "--output", str(out)).returncode == 0
    refused = {"error": {"message": CONTEXT, "type": "BadRequestError", "param": None, "code": 400}}
    lines = [
        {"id": "v0", "custom_id": "r00000", "response": {"status_code": 400, "body": None}, "error": refused},
        {"id": "v1", "custom_id": "r00001", "response": {"status_code": 200, "body": {
            "model": "gpt-4o-mini", "choices": [{"message": {"content": '{"label": "ecstatic"}'}}]}}, "error": None},
    ]  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = str(ROOT / "configs" / "sentiment.toml")
    ingest = cli("batch", "ingest", str(out), str(results), "--input", str(source), "--config", config)
    assert ingest.returncode == 1, ingest.stderr
    assert "context_length: the text does not fit the model's context" in ingest.stderr
    assert "--max-model-len" in ingest.stderr and "leaves these rows out" in ingest.stderr
    left = prepare(source, tmp_path / "left", "--output", str(out))
    assert "wrote 2 requests in 1 files" in left.stdout and "also left out 1 rows" in left.stdout
    written = [json.loads(x)["custom_id"] for x in (tmp_path / "left" / "requests-0001.jsonl").read_text().splitlines()]
    assert written == ["r00001", "r00002"]
    anyway = prepare(source, tmp_path / "all", "--output", str(out), "--retry-refused")
    assert "wrote 3 requests in 1 files" in anyway.stdout and "also left out" not in anyway.stdout


def test_results_run_by_vllm_and_ingested_keep_their_confidence(sim: Any, tmp_path: Path) -> None:
    """prepare → replies shaped like vLLM's (stop token after the logprobs) → ingest: every row has a confidence."""
    sim.configure(server="vllm")
    source = write_csv(tmp_path / "in.csv", reviews(12))
    out = tmp_path / "out.parquet"
    assert prepare(source, tmp_path / "req", "--output", str(out)).returncode == 0
    results = tmp_path / "req" / "results-0001.jsonl"
    run_like_vllm(sim, tmp_path / "req" / "requests-0001.jsonl", results, fail="", spoil="")
    assert "</s>" in results.read_text()
    config = str(ROOT / "configs" / "sentiment.toml")
    ingest = cli("batch", "ingest", str(out), str(results), "--input", str(source), "--config", config)
    assert ingest.returncode == 0, ingest.stderr
    confidences = [r["confidence"] for r in open_sink(out).iter_records()]
    assert len(confidences) == 12 and all(c is not None and 0 < c <= 1 for c in confidences)
