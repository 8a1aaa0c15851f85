"""Batch results and request files as vLLM `run_batch` reads and writes them, and what a failed or refused batch
leaves behind: error text kept in every shape, a run_batch command that works, no rows said to be at the provider
that never got there, and requests refused as sent not sent again unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.engines.batch.ingest import read_result
from pipeline.prompt import Prompt

from .helpers import ROOT, dead_letters, label_batch, reviews, write_csv

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
