"""The batch engine against the simulator's Batch API: exactly once, splitting, failures, expiry, --no-wait, auto."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.pricing import cost_of
from pipeline.errors import BatchError
from pipeline.ratelimit.limiter import RetryPolicy
from pipeline.simulator import SimulatorConfig, SimulatorThread

from .helpers import cli, dead_letters, label_args, label_batch, ledger, reviews, sink_ids, write_csv
from .test_simulator import FakeClock


def submissions(sim: Any) -> Counter[str]:
    """How often each custom_id went to the simulator's Batch API."""
    return Counter(sim.batch_summary()["submissions"])


def test_a_batch_run_labels_every_row_once_at_half_the_price(sim: Any, tmp_path: Path) -> None:
    """250 rows in batches of 100: each id submitted once and in the sink once; cost is half of standard."""
    sim.configure(batch_seconds=0.2)
    rows = reviews(250)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    summary = label_batch(sim, source, out, max_requests=100)
    wanted = sorted(r[0] for r in rows)
    assert summary.exit_code == 0 and (summary.labeled, summary.failed, summary.batches) == (250, 0, 3)
    assert sorted(sink_ids(out)) == wanted
    assert submissions(sim) == Counter(wanted)
    assert summary.cost_usd is not None and summary.standard_cost_usd is not None
    assert summary.cost_usd == pytest.approx(summary.standard_cost_usd / 2)
    assert "at batch prices" in summary.render()
    record = json.loads(out.read_text().splitlines()[0])
    assert record["model"] == "gpt-4o-mini" and record["prompt_tokens"] > 0 and record["text_sha"]
    assert [s["state"] for s in ledger(out)["submissions"]] == ["collected"] * 3
    assert not list((tmp_path / "out.jsonl.meta" / "batches").iterdir()), "collected batches leave no files"
    before = sim.batch_summary()
    again = label_batch(sim, source, out)
    assert (again.labeled, again.batches, again.skipped_done) == (0, 0, 250)
    assert sim.batch_summary() == before, "a complete sink makes no API call"


def test_request_files_split_at_the_byte_limit_and_each_row_goes_once(sim: Any, tmp_path: Path) -> None:
    """With a small byte limit every request file stays under it, and together they hold each row once."""
    sim.configure(batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(60))
    out = tmp_path / "out.parquet"
    summary = label_batch(sim, source, out, max_bytes=20_000)
    subs = ledger(out)["submissions"]
    assert summary.labeled == 60 and len(subs) >= 4
    assert all(s["bytes"] <= 20_000 and s["model"] == "gpt-4o-mini" for s in subs)
    assert sum(s["requests"] for s in subs) == 60 and max(submissions(sim).values()) == 1
    assert sorted(sink_ids(out)) == sorted(r[0] for r in reviews(60))


def test_failed_items_are_dead_lettered_and_sent_once_more_by_the_next_run(sim: Any, tmp_path: Path) -> None:
    """Items the provider fails become dead letters (exit 1); the next run sends exactly those again."""
    sim.configure(batch_seconds=0, batch_error_rate=0.2, seed=7)
    rows = reviews(100)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    first = label_batch(sim, source, out)
    failed = {letter["id"] for letter in dead_letters(out)}
    assert first.exit_code == 1 and first.failed == len(failed) > 0 and first.labeled == 100 - len(failed)
    assert {letter["kind"] for letter in dead_letters(out)} == {"server_error"}
    sim.configure(batch_error_rate=0.0)
    second = label_batch(sim, source, out)
    assert second.exit_code == 0 and second.labeled == len(failed)
    counts = submissions(sim)
    assert {cid for cid, n in counts.items() if n == 2} == failed and max(counts.values()) == 2
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)


def test_batch_replies_are_validated_like_online_replies(sim: Any, tmp_path: Path) -> None:
    """A reply whose label is not in the set is dead-lettered as invalid_label, exactly as online."""
    sim.configure(batch_seconds=0)
    sim.script([{"kind": "label_outside", "match": "review 4: fine"}, {"kind": "refusal", "match": "리뷰 7:"}])
    source = write_csv(tmp_path / "in.csv", reviews(10))
    out = tmp_path / "out.jsonl"
    summary = label_batch(sim, source, out)
    kinds = {letter["id"]: letter["kind"] for letter in dead_letters(out)}
    assert kinds == {"r00004": "invalid_label", "r00007": "refusal"}
    assert summary.failed == 2 and summary.labeled == 8


def test_the_tokens_of_unusable_batch_replies_are_counted_and_priced(sim: Any, tmp_path: Path) -> None:
    """Batch replies that gave no label were billed: the summary's tokens and cost equal the batch's own usage."""
    import openai  # noqa: PLC0415 - the batch's usage, as the provider reports it

    sim.configure(batch_seconds=0)
    sim.script(
        [{"kind": "label_outside", "match": "review 4: fine"}, {"kind": "bad_json_content", "match": "review 6: fine"}]
    )
    summary = label_batch(sim, write_csv(tmp_path / "in.csv", reviews(10)), tmp_path / "out.jsonl")
    assert (summary.labeled, summary.failed, summary.unusable_replies) == (8, 2, 2)
    [made] = sim.batch_summary()["batches"]
    usage = openai.OpenAI(api_key="sk-test-key", base_url=sim.base_url).batches.retrieve(made["id"]).usage
    assert usage is not None
    assert (summary.prompt_tokens, summary.completion_tokens) == (usage.input_tokens, usage.output_tokens)
    assert summary.cost_usd == pytest.approx(
        cost_of("gpt-4o-mini", usage.input_tokens, usage.output_tokens, tier="batch")
    )


def test_rows_of_an_expired_batch_are_sent_again_by_the_next_run(sim: Any, tmp_path: Path) -> None:
    """An expired batch keeps what finished; its unfinished rows are not failures and go out again next run."""
    sim.configure(batch_seconds=0.6, batch_window_seconds=0.3)
    rows = reviews(40)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    first = label_batch(sim, source, out)
    assert (first.labeled, first.unfinished, first.failed) == (20, 20, 0)
    assert first.exit_code == 1 and not dead_letters(out)
    assert "to send the 20 unprocessed rows again, re-run" in first.render()
    assert ledger(out)["submissions"][0]["status"] == "expired"
    sim.configure(batch_seconds=0, batch_window_seconds=86_400)
    second = label_batch(sim, source, out)
    assert (second.labeled, second.exit_code) == (20, 0)
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    assert sorted(submissions(sim).values()) == [1] * 20 + [2] * 20


def test_no_wait_returns_after_submitting_and_the_same_command_collects(sim: Any, tmp_path: Path) -> None:
    """--no-wait sends and returns (exit 0); a re-run meanwhile sends nothing twice; a later one collects."""
    sim.configure(batch_seconds=3600)
    source = write_csv(tmp_path / "in.csv", reviews(80))
    out = tmp_path / "out.jsonl"
    sent = label_batch(sim, source, out, wait=False, max_requests=50)
    assert (sent.exit_code, sent.labeled, sent.pending, sent.batches) == (0, 0, 80, 2)
    assert "collect the results" in sent.render() and "submitted" in sent.render()
    again = label_batch(sim, source, out, wait=False)
    assert (again.batches, again.in_batches, again.pending) == (0, 80, 80)
    sim.configure(batch_seconds=0)
    collected = label_batch(sim, source, out, wait=False)
    assert (collected.labeled, collected.batches, collected.pending) == (80, 0, 0)
    assert max(submissions(sim).values()) == 1 and len(sink_ids(out)) == 80


def test_an_online_run_says_when_batches_still_hold_its_rows(sim: Any, tmp_path: Path) -> None:
    """Labeling online the rows a running batch holds pays twice: the online run says so, once it holds the sink."""
    sim.configure(batch_seconds=3600)
    source = write_csv(tmp_path / "in.csv", reviews(30))
    out = tmp_path / "out.jsonl"
    assert label_batch(sim, source, out, wait=False).batches == 1
    online = cli(*label_args(sim, source, out, "--limit", "1", "--no-dedupe"))
    assert online.returncode == 0, online.stderr
    assert "note: 30 rows of" in online.stderr and "in batches still running" in online.stderr


@pytest.fixture
def timed() -> Iterator[tuple[SimulatorThread, FakeClock]]:
    """A simulator of its own whose clock moves only when the test says so."""
    clock = FakeClock()
    with SimulatorThread(SimulatorConfig(latency_ms=0, batch_seconds=10), clock=clock) as running:
        yield running, clock


def test_a_cancelled_batch_keeps_its_results_and_the_rest_is_sent_again(
    timed: tuple[SimulatorThread, FakeClock], tmp_path: Path
) -> None:
    """After `batch cancel` half-way, the next run keeps what the batch finished and sends only the rest again."""
    sim, clock = timed
    rows = reviews(30)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    label_batch(sim, source, out, wait=False)
    clock.advance(5)  # half of batch_seconds: 15 of 30 requests have finished
    cancelled = cli("batch", "cancel", str(out), "--base-url", sim.base_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert [b["status"] for b in sim.batch_summary()["batches"]] == ["cancelled"]
    sim.configure(batch_seconds=0)
    summary = label_batch(sim, source, out)
    assert summary.exit_code == 0 and summary.labeled == 30 and summary.batches == 1
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    first = ledger(out)["submissions"][0]
    assert first["status"] == "cancelled" and first["outcome"]["labeled"] == 15
    assert sorted(submissions(sim).values()) == [1] * 15 + [2] * 15


def test_a_crash_after_appending_but_before_recording_appends_nothing_twice(sim: Any, tmp_path: Path) -> None:
    """Batches whose results are in the sink but not yet marked collected are collected again: all skipped."""
    sim.configure(batch_seconds=0)
    source = write_csv(tmp_path / "in.csv", reviews(50))
    out = tmp_path / "out.jsonl"
    label_batch(sim, source, out, max_requests=20)
    book = ledger(out)
    rows_files = tmp_path / "out.jsonl.meta" / "batches"
    # What a kill between the sink append and the ledger record leaves: submitted, rows file still there.
    from pipeline.engines.batch.files import row_line  # noqa: PLC0415
    from pipeline.results import Row  # noqa: PLC0415

    by_id = {r[0]: r for r in reviews(50)}
    for sub in book["submissions"]:
        sub["state"] = "submitted"
    for sub, ids in zip(
        book["submissions"], ([f"r{i:05d}" for i in range(a, b)] for a, b in ((0, 20), (20, 40), (40, 50))), strict=True
    ):
        (rows_files / f"{sub['id']}.rows.jsonl").write_bytes(
            b"".join(row_line(Row(i, by_id[i][2], 1, {"lang": by_id[i][1]})) for i in ids)
        )
    (tmp_path / "out.jsonl.meta" / "batches.json").write_text(json.dumps(book))
    summary = label_batch(sim, source, out)
    assert (summary.labeled, summary.failed, summary.batches) == (0, 0, 0)
    assert [s["outcome"]["skipped"] for s in ledger(out)["submissions"]] == [20, 20, 10]
    ids = sink_ids(out)
    assert len(ids) == len(set(ids)) == 50


def test_auto_labels_a_slice_online_then_the_rest_in_batches(sim: Any, tmp_path: Path) -> None:
    """--engine auto: the first rows online, the rest through the Batch API, one sink, one summary."""
    sim.configure(batch_seconds=0)
    rows = reviews(120)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    notice = io.StringIO()
    summary = label_batch(sim, source, out, engine="auto", online_rows=20, notice=notice)
    assert summary.engine == "auto" and (summary.labeled, summary.failed) == (120, 0)
    assert sim.stats()["requests"] == 20 and sum(submissions(sim).values()) == 100
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    assert "online check passed" in notice.getvalue()
    assert summary.cost_usd is not None and summary.standard_cost_usd is not None
    assert summary.cost_usd < summary.standard_cost_usd
    assert "online and batch prices" in summary.render()
    again = label_batch(sim, source, out, engine="auto", online_rows=20)
    assert again.labeled == 0 and sim.stats()["requests"] == 20, "a sink with batches goes straight to them"


def test_auto_sends_no_batch_when_the_online_slice_fails(sim: Any, tmp_path: Path) -> None:
    """When most of the online slice fails (a broken prompt), auto stops before any batch is sent."""
    sim.script([{"kind": "label_outside", "count": -1}])
    source = write_csv(tmp_path / "in.csv", reviews(60))
    out = tmp_path / "out.jsonl"
    once = RetryPolicy(max_attempts=1, base_wait=0.001, max_wait=0.01, timeout=5.0)  # 10 replies: under the streak stop
    with pytest.raises(BatchError, match="no batch was sent"):
        label_batch(sim, source, out, engine="auto", online_rows=10, retry=once)
    assert sim.batch_summary()["batches"] == []


def test_an_endpoint_without_a_batch_api_says_what_to_do(sim: Any, tmp_path: Path) -> None:
    """A 404 on the Files API is a BatchError pointing at `batch prepare` and `batch ingest`."""
    source = write_csv(tmp_path / "in.csv", reviews(5))

    class Elsewhere:
        base_url = sim.base_url + "/nothing-here"

    with pytest.raises(BatchError, match="batch prepare"):
        label_batch(Elsewhere(), source, tmp_path / "out.jsonl")


def test_batches_are_looked_for_only_where_they_were_sent(sim: Any, tmp_path: Path) -> None:
    """A run with another endpoint refuses to touch the sink's live batches; a vanished batch is a clear error."""
    sim.configure(batch_seconds=3600)
    source = write_csv(tmp_path / "in.csv", reviews(10))
    out = tmp_path / "out.jsonl"
    label_batch(sim, source, out, wait=False)

    class Elsewhere:
        base_url = sim.base_url.replace("127.0.0.1", "localhost")

    with pytest.raises(BatchError, match="this run uses"):
        label_batch(Elsewhere(), source, out)
    sim.reset()  # a restarted simulator knows no batch
    with pytest.raises(BatchError, match=r"batches\.json aside"):
        label_batch(sim, source, out)
    assert ledger(out)["submissions"][0]["state"] == "submitted", "nothing is forgotten without the user's say"


def test_a_create_that_gets_no_reply_is_looked_up_not_repeated(sim: Any, tmp_path: Path) -> None:
    """A create that times out after the provider made the batch is found by its submission id: one batch."""
    from pipeline.engines.batch.api import BatchApi  # noqa: PLC0415 - the engine's parts, driven directly
    from pipeline.engines.batch.files import request_line  # noqa: PLC0415
    from pipeline.engines.batch.ledger import Ledger, Submission  # noqa: PLC0415
    from pipeline.engines.batch.submit import submit  # noqa: PLC0415
    from pipeline.ratelimit.limiter import RetryPolicy  # noqa: PLC0415
    from pipeline.results import Row  # noqa: PLC0415
    from pipeline.sinks import SinkMeta  # noqa: PLC0415
    from pipeline.task.prompt import Prompt  # noqa: PLC0415

    from .helpers import SENTIMENT  # noqa: PLC0415

    sim.configure(create_reply_seconds=3, batch_seconds=3600)
    book = Ledger(SinkMeta(tmp_path / "out.jsonl"))
    book.ensure()
    lines = b"".join(request_line(Prompt(SENTIMENT), Row(f"r{i}", f"text {i}", i), "gpt-4o-mini") for i in range(3))
    book.requests_path("sub_t1").write_bytes(lines)
    sub = Submission(id="sub_t1", model="gpt-4o-mini", requests=3, bytes=len(lines))
    book.add(sub)

    async def send() -> Any:
        quick = RetryPolicy(max_attempts=3, base_wait=0.01, max_wait=0.02, timeout=0.5)
        api = BatchApi(api_key="sk-test-key", base_url=sim.base_url, retry=quick)
        try:
            return await submit(api, book, sub, settle=0)
        finally:
            await api.aclose()

    batch = asyncio.run(send())
    made = sim.batch_summary()["batches"]
    assert [b["id"] for b in made] == [batch.id], "the create was sent again"
    assert (sub.state, sub.batch_id) == ("submitted", batch.id)
    assert ledger(tmp_path / "out.jsonl")["submissions"][0]["state"] == "submitted"


def test_cost_tiers_bill_batch_and_flex_at_half() -> None:
    """cost_of: batch and flex cost half of standard where offered (flex: not for gpt-4o-mini); an unknown tier is
    refused."""
    standard = cost_of("gpt-4o-mini", 1_000_000, 1_000_000)
    assert standard == pytest.approx(0.75)
    assert cost_of("gpt-4o-mini", 1_000_000, 1_000_000, tier="batch") == pytest.approx(0.375)
    assert cost_of("gpt-4o-mini", 1_000_000, 1_000_000, tier="flex") is None
    assert cost_of("o4-mini", 1_000_000, 1_000_000, tier="flex") == pytest.approx((1.10 + 4.40) / 2)
    assert cost_of("unknown-model", 1, 1, tier="batch") is None
    with pytest.raises(ValueError, match="tier"):
        cost_of("gpt-4o-mini", 1, 1, tier="cheap")  # type: ignore[arg-type]
