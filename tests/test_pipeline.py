"""End to end over HTTP: the real AsyncOpenAI client against the simulator on 127.0.0.1, no SDK mocks."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.errors import FatalApiError, InputError, SinkError, SinkMismatchError
from pipeline.ratelimit.limiter import RetryPolicy
from pipeline.results import Labeled, Row, record, text_sha
from pipeline.sinks import open_sink
from pipeline.sinks.parquet import record_schema
from pipeline.task.config import RESERVED_FIELDS, load_config, parse_config

from .helpers import ROOT, SENTIMENT, dead_letters, ids_once, label, progress, reviews, sink_ids, write_csv

SINKS = ["out.jsonl", "out.parquet"]


@pytest.mark.parametrize("name", SINKS)
def test_labels_every_row_once_with_a_valid_label(sim: Any, tmp_path: Path, name: str) -> None:
    """Each input row ends in the sink exactly once, with a label from the set and its carried column."""
    rows = reviews(120)
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), tmp_path / name)
    assert summary.exit_code == 0
    records = list(open_sink(tmp_path / name).iter_records())
    assert sorted(r["id"] for r in records) == sorted(r[0] for r in rows)
    assert {r["label"] for r in records} <= set(SENTIMENT.labels)
    assert all(r["lang"] in {"ko", "en"} and r["attempts"] == 1 and r["prompt_tokens"] > 0 for r in records)
    assert sim.stats()["by_status"] == {"200": 120}


@pytest.mark.parametrize("name", SINKS)
def test_rerun_on_a_complete_sink_makes_no_requests(sim: Any, tmp_path: Path, name: str) -> None:
    """Re-running the same job on a complete sink sends zero requests and changes nothing."""
    source = write_csv(tmp_path / "in.csv", reviews(40))
    label(sim, source, tmp_path / name)
    sim.reset()
    summary = label(sim, source, tmp_path / name)
    assert sim.stats()["requests"] == 0
    assert summary.skipped_done == 40 and summary.labeled == 0
    assert len(sink_ids(tmp_path / name)) == 40


@pytest.mark.parametrize("name", SINKS)
def test_limit_walks_through_the_file_batch_by_batch(sim: Any, tmp_path: Path, name: str) -> None:
    """--limit N labels N new rows per run, so repeated runs cover the file once, without repeats."""
    source = write_csv(tmp_path / "in.csv", reviews(25))
    for expected in (10, 20, 25, 25):
        label(sim, source, tmp_path / name, max_rows=10)
        ids = sink_ids(tmp_path / name)
        assert len(ids) == len(set(ids)) == expected


def test_duplicate_ids_are_labeled_once_and_reported(sim: Any, tmp_path: Path) -> None:
    """A repeated id is labeled once; exact repeats and repeats with other text are counted apart, with lines."""
    rows = [*reviews(5), reviews(5)[1], ("r00001", "ko", "again"), ("r00002", "en", "and again")]
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl")
    assert sorted(sink_ids(tmp_path / "out.jsonl")) == sorted(r[0] for r in reviews(5))
    assert (summary.duplicates, summary.conflicts) == (1, 2)
    text = summary.render()
    assert "1 repeated ids skipped" in text and "r00001 (line 6)" in text
    assert "2 ids repeated with different text" in text and "r00001 (line 7)" in text


def test_retries_server_errors_rate_limits_and_malformed_replies(sim: Any, tmp_path: Path) -> None:
    """500s, 429s and unusable replies are retried until the row is labeled; nothing is dead-lettered."""
    sim.script(
        [
            {"kind": "status", "status": 500, "count": 3},
            {"kind": "status", "status": 429, "count": 2, "retry_after_ms": 50},
            {"kind": "not_json", "count": 1},
            {"kind": "label_outside", "count": 1},
            {"kind": "bad_json_content", "count": 1},
            {"kind": "reset", "count": 1},
        ]
    )
    patient = RetryPolicy(max_attempts=12, base_wait=0.001, max_wait=0.01, timeout=5.0)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(30)), out, concurrency=2, retry=patient)
    assert summary.exit_code == 0 and summary.failed == 0
    assert len(ids_once(tmp_path / "out.jsonl")) == 30
    assert summary.retries == 9
    assert summary.rate_limited >= 1
    assert sim.stats()["requests"] == 39


def test_a_row_that_always_fails_is_dead_lettered_with_the_reason(sim: Any, tmp_path: Path) -> None:
    """A row whose replies are always unusable ends in the dead-letter file after max attempts; the run goes on."""
    sim.script([{"kind": "label_outside", "count": -1, "match": "review 4:"}])
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(10)), tmp_path / "out.jsonl")
    assert summary.exit_code == 1
    assert summary.failed == 1 and summary.labeled == 9
    [letter] = dead_letters(tmp_path / "out.jsonl")
    assert letter["id"] == "r00004" and letter["kind"] == "invalid_label" and letter["attempts"] == 4
    assert "is not one of" in letter["message"]
    assert "invalid_label ×1" in summary.render()
    assert "r00004" not in sink_ids(tmp_path / "out.jsonl")
    # The next run retries only that row.
    sim.reset()
    again = label(sim, tmp_path / "in.csv", tmp_path / "out.jsonl")
    assert sim.stats()["requests"] == 1 and again.exit_code == 0
    assert len(ids_once(tmp_path / "out.jsonl")) == 10


def test_bad_rows_are_dead_lettered_without_a_request(sim: Any, tmp_path: Path) -> None:
    """Empty or ragged rows are dead-lettered with the reason and never sent."""
    path = tmp_path / "in.csv"
    path.write_text("id,lang,text\n1,en,fine\n2,en,   \n3,en,a,b,c\n4,en,also fine\n", encoding="utf-8")
    summary = label(sim, path, tmp_path / "out.jsonl")
    assert sim.stats()["requests"] == 2
    assert {d["id"]: d["kind"] for d in dead_letters(tmp_path / "out.jsonl")} == {"2": "empty_text", "3": "ragged_row"}
    assert summary.exit_code == 1


@pytest.mark.parametrize(("status", "words"), [(401, "rejected the API key"), (404, "does not serve model")])
def test_auth_and_unknown_model_stop_the_run_early(sim: Any, tmp_path: Path, status: int, words: str) -> None:
    """401/404 stop the run after the first replies with one message, instead of failing every row."""
    sim.script([{"kind": "status", "status": status, "count": -1}])
    with pytest.raises(FatalApiError, match=words):
        label(sim, write_csv(tmp_path / "in.csv", reviews(500)), tmp_path / "out.jsonl", concurrency=4)
    assert sim.stats()["requests"] <= 8
    assert dead_letters(tmp_path / "out.jsonl") == []


def test_missing_text_column_fails_before_any_request(sim: Any, tmp_path: Path) -> None:
    """A CSV without the text column is an InputError and the simulator sees no request."""
    path = write_csv(tmp_path / "in.csv", [("1", "x")], header=("id", "body"))
    with pytest.raises(InputError, match="text column 'text' not found"):
        label(sim, path, tmp_path / "out.jsonl")
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("name", SINKS)
def test_config_guard_refuses_another_model_unless_forced(sim: Any, tmp_path: Path, name: str) -> None:
    """Resuming with another model is refused naming both; --force resumes and records it in the manifest."""
    source = write_csv(tmp_path / "in.csv", reviews(12))
    label(sim, source, tmp_path / name, max_rows=5)
    other = SENTIMENT.with_overrides(model="gpt-4o")
    with pytest.raises(SinkMismatchError, match="gpt-4o-mini → gpt-4o"):
        label(sim, source, tmp_path / name, config=other)
    summary = label(sim, source, tmp_path / name, config=other, force=True)
    assert summary.labeled == 7
    manifest = orjson.loads((tmp_path / f"{name}.meta" / "manifest.json").read_bytes())
    assert manifest["model"] == "gpt-4o"
    assert "gpt-4o-mini → gpt-4o" in manifest["forced"][0]["differences"][0]


def test_prompt_change_is_refused(sim: Any, tmp_path: Path) -> None:
    """Changing the instructions between runs is caught by the prompt fingerprint."""
    source = write_csv(tmp_path / "in.csv", reviews(6))
    label(sim, source, tmp_path / "out.jsonl", max_rows=2)
    changed = parse_config(
        {
            "instructions": "Something else.",
            "labels": dict(zip(SENTIMENT.labels, SENTIMENT.label_descriptions, strict=True)),
        }
    )
    with pytest.raises(SinkMismatchError, match="prompt"):
        label(sim, source, tmp_path / "out.jsonl", config=changed.with_overrides(carry=("lang",)))


def test_multi_label_end_to_end(sim: Any, tmp_path: Path) -> None:
    """The topics config labels tickets with lists of labels built from a template."""
    config = load_config(ROOT / "configs" / "topics.toml")
    rows = [(f"t{i}", "email", f"Subject {i}", f"body {i}") for i in range(15)]
    source = write_csv(tmp_path / "in.csv", rows, header=("ticket_id", "channel", "subject", "body"))
    label(sim, source, tmp_path / "out.parquet", config=config)
    records = list(open_sink(tmp_path / "out.parquet").iter_records())
    assert len(records) == 15
    assert all(isinstance(r["label"], list) and set(r["label"]) <= set(config.labels) for r in records)


@pytest.mark.slow
def test_ten_thousand_rows(sim: Any, tmp_path: Path) -> None:
    """A 10,000-row file is labeled completely, each id once (its speed is measured by scripts/bench_throughput.py)."""
    rows = reviews(10_000)
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl", concurrency=64)
    ids = sink_ids(tmp_path / "out.jsonl")
    assert summary.labeled == 10_000
    assert len(ids) == len(set(ids)) == 10_000


def test_a_request_the_endpoint_always_rejects_stops_the_run(sim: Any, tmp_path: Path) -> None:
    """When the first 20 requests all get 400 and none succeeds, the run stops with that error instead of going on."""
    sim.script([{"kind": "status", "status": 400, "count": -1, "message": "response_format is not supported"}])
    with pytest.raises(FatalApiError, match="response_format is not supported"):
        label(sim, write_csv(tmp_path / "in.csv", reviews(300)), tmp_path / "out.jsonl", concurrency=4)
    assert sim.stats()["requests"] <= 24


def test_fatal_error_mid_run_saves_everything_already_finished(sim: Any, tmp_path: Path) -> None:
    """When a 401 stops the run midway, every row the run finished is in the sink (none left in the queues)."""
    sim.configure(latency_ms=5)
    sim.script([{"kind": "status", "status": 401, "count": -1, "match": "review 400:"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(FatalApiError):
        label(sim, write_csv(tmp_path / "in.csv", reviews(600)), out, concurrency=64, checkpoint_rows=10_000)
    summary = progress(out)["summary"]
    ids = sink_ids(out)
    assert len(ids) == len(set(ids)) == summary["labeled"] == summary["saved"] > 0
    # Only replies still in flight at the stop are abandoned: at most one per worker.
    assert sim.stats(events=False)["completed_ok"] - summary["labeled"] <= 64


def test_restart_never_moves_a_sink_that_another_run_is_writing(sim: Any, tmp_path: Path) -> None:
    """--skip_labeled False takes the sink's lock before moving it aside, so a running job keeps its sink."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    out = tmp_path / "out.jsonl"
    label(sim, source, out)
    holder = open_sink(out).meta
    holder.lock()
    try:
        with pytest.raises(SinkError, match="another labelstream run"):
            label(sim, source, out, restart=True)
    finally:
        holder.unlock()
    assert len(sink_ids(out)) == 5
    assert not list(tmp_path.glob("out.jsonl.bak-*"))


def test_limit_moves_past_rows_that_can_never_be_labeled(sim: Any, tmp_path: Path) -> None:
    """Unusable rows do not count against --limit, so batches move forward even when a file starts with them."""
    path = tmp_path / "in.csv"
    path.write_text("id,text\n1,\n2,\n3,\n4,good\n5,fine\n", encoding="utf-8")
    summary = label(sim, path, tmp_path / "out.jsonl", max_rows=2)
    assert sorted(sink_ids(tmp_path / "out.jsonl")) == ["4", "5"]
    assert summary.failed == 3


def test_named_id_column_must_exist(sim: Any, tmp_path: Path) -> None:
    """An id column named explicitly (--id-column) that the CSV lacks is an error; the config default falls back."""
    source = write_csv(tmp_path / "in.csv", [("x", "hello")], header=("lang", "text"))
    with pytest.raises(InputError, match="id column 'review_id' not found"):
        label(
            sim,
            source,
            tmp_path / "a.jsonl",
            config=SENTIMENT.with_overrides(id_column="review_id"),
            require_id_column=True,
        )
    label(sim, source, tmp_path / "b.jsonl")  # sentiment.toml names "id"; absent, ids become content hashes
    assert len(sink_ids(tmp_path / "b.jsonl")) == 1


def test_record_fields_are_the_reserved_names() -> None:
    """The fields every record carries, in both sinks, are exactly the names a carry column may not take."""
    item = Labeled(Row(id="1", text="t", line=1), "a", "m", 1, 1, 1.0, 1, "2026-01-01T00:00:00.000Z")
    assert set(record(item)) == RESERVED_FIELDS
    assert set(record_schema([], multi_label=False).names) == RESERVED_FIELDS


@pytest.mark.parametrize("name", SINKS)
def test_edited_rows_are_reported_and_relabel_changed_relabels_only_them(sim: Any, tmp_path: Path, name: str) -> None:
    """A resume reports done ids whose text changed; --relabel-changed labels just those again, each id once."""
    rows = reviews(10)
    out = tmp_path / name
    label(sim, write_csv(tmp_path / "in.csv", rows), out)
    edited = [*rows]
    edited[2] = (rows[2][0], "en", "edited after labeling")
    edited[7] = (rows[7][0], "en", "also edited")
    source = write_csv(tmp_path / "in.csv", [*edited, ("new1", "en", "a new row")])
    sim.reset()
    summary = label(sim, source, out)
    assert (summary.changed, summary.labeled) == (2, 1)
    assert "2 rows already in the sink now have different text" in summary.render()
    assert "--relabel-changed" in summary.render()
    assert sim.stats()["requests"] == 1
    sim.reset()
    relabeled = label(sim, source, out, relabel_changed=True)
    assert (relabeled.labeled, relabeled.changed) == (2, 0)
    assert sim.stats()["requests"] == 2
    records = {r["id"]: r for r in open_sink(out).iter_records()}
    ids = sink_ids(out)
    assert len(ids) == len(set(ids)) == 11
    assert records[rows[2][0]]["text_sha"] == text_sha("edited after labeling")
    sim.reset()
    assert label(sim, source, out, relabel_changed=True).labeled == 0
    assert sim.stats()["requests"] == 0


def test_another_input_file_is_allowed_and_said(sim: Any, tmp_path: Path) -> None:
    """Resuming a sink from a different CSV works (ids already done are skipped) but the run says so."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "a.csv", reviews(5)), out)
    notice = io.StringIO()
    summary = label(sim, write_csv(tmp_path / "b.csv", reviews(8)), out, notice=notice)
    assert summary.labeled == 3
    assert f"this sink was labeled from {(tmp_path / 'a.csv').resolve()}" in notice.getvalue()
