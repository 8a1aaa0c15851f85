"""Pay once per distinct text: repeated texts are sent once, every id still gets its own record (run/dedupe.py)."""

from __future__ import annotations

import io
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.analysis.overview import overview
from pipeline.analysis.report import write_report
from pipeline.errors import Interrupted
from pipeline.input.shards import Shard, shard_of
from pipeline.run.dedupe import Dedupe
from pipeline.sinks import open_shards, open_sink

from .helpers import cli, dead_letters, label, label_batch, progress, reviews, sink_ids, start_cli, wait_for, write_csv

COMMON = ["좋아요", "Great!", "별로"]


def repeated_rows(n: int, prefix: str = "r") -> list[tuple[str, str, str]]:
    """n rows; every third row repeats one of three short common reviews, the rest are distinct."""
    unique = reviews(n, prefix)
    return [(rid, lang, COMMON[i % 9 // 3] if i % 3 == 0 else text) for i, (rid, lang, text) in enumerate(unique)]


def records(output: Path) -> list[dict[str, Any]]:
    """Every record of a sink, in write order."""
    return list(open_sink(output).iter_records())


def check_copies(recs: list[dict[str, Any]], *, exact: bool = True) -> int:
    """Each copy follows a record of its own text (exact: the same text_sha) that is not a copy; returns how many
    copies there are."""
    seen: dict[str, dict[str, Any]] = {}
    copies = 0
    for rec in recs:
        if rec["copied_from"] is not None:
            original = seen[rec["copied_from"]]  # written before the copy
            assert original["copied_from"] is None
            assert original["label"] == rec["label"]
            assert original["text_sha"] == rec["text_sha"] or not exact
            assert rec["prompt_tokens"] == rec["completion_tokens"] == 0
            copies += 1
        seen[rec["id"]] = rec
    return copies


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_repeated_texts_are_sent_once_and_every_id_gets_a_record(sim: Any, tmp_path: Path, name: str) -> None:
    """300 rows with 3 texts repeated by 100 of them: 203 requests, 300 records, 97 marked copied_from."""
    rows = repeated_rows(300)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    summary = label(sim, source, out)
    assert sim.stats()["requests"] == 203
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(r[0] for r in rows)
    assert check_copies(recs) == 97
    assert summary.copies == 97
    assert summary.copy_saving_usd is not None and summary.copy_saving_usd > 0
    assert "97 rows repeated a text sent once" in summary.render()


def test_no_dedupe_sends_every_row(sim: Any, tmp_path: Path) -> None:
    """dedupe=False (--no-dedupe): one request per row, no copies."""
    source = write_csv(tmp_path / "in.csv", repeated_rows(90))
    out = tmp_path / "out.jsonl"
    label(sim, source, out, dedupe=False)
    assert sim.stats()["requests"] == 90
    assert check_copies(records(out)) == 0


def test_resume_copies_texts_already_in_the_sink_without_a_request(sim: Any, tmp_path: Path) -> None:
    """A later input whose texts the sink already holds (under other ids) is labeled with zero requests."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "a.csv", repeated_rows(60, "a")), out)
    before = sim.stats()["requests"]
    later = [(f"b{rid[1:]}", lang, text) for rid, lang, text in repeated_rows(60, "a")]
    label(sim, write_csv(tmp_path / "b.csv", later), out)
    assert sim.stats()["requests"] == before
    recs = records(out)
    assert len(recs) == 120 and len(set(sink_ids(out))) == 120
    assert check_copies(recs) == 60 + 17  # every b row, and the 20 - 3 repeats within a


def test_copies_of_a_failed_original_are_dead_lettered_then_labeled_next_run(sim: Any, tmp_path: Path) -> None:
    """An original that fails takes its waiting copies into the dead letters (copy_of_failed); the next run
    labels them."""
    rows = repeated_rows(30)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    sim.configure(latency_ms=100)  # the original is still in flight when the reader reaches its repeats
    sim.script([{"kind": "label_outside", "match": "좋아요", "count": -1}])
    label(sim, source, out)
    letters = {d["id"]: d["kind"] for d in dead_letters(out)}
    assert sorted(letters.values()) == ["copy_of_failed"] * 3 + ["invalid_label"]
    assert not {r[0] for r in rows if r[2] == "좋아요"} & set(sink_ids(out))
    sim.reset()  # no faults, no latency
    label(sim, source, out)
    assert sorted(sink_ids(out)) == sorted(r[0] for r in repeated_rows(30))
    check_copies(records(out))


@pytest.mark.crash
def test_kill_9_mid_run_then_resume_gives_each_id_once_and_no_copy_without_original(sim: Any, tmp_path: Path) -> None:
    """SIGKILL after the first checkpoints: the sink never holds a copy before its original; the resume finishes
    with every id exactly once."""
    sim.configure(latency_ms=20)
    rows = repeated_rows(2000)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    args = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--no-progress",
            "--concurrency", "8", "--checkpoint-every", "25", "--checkpoint-seconds", "0.2"]  # fmt: skip
    proc = start_cli(*args)
    wait_for(lambda: progress(out).get("saved", 0) >= 100 or proc.poll() is not None, what="first checkpoints")
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    check_copies(records(out))
    assert len(records(out)) < len(rows)
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    ids = sink_ids(out)
    assert sorted(ids) == sorted(r[0] for r in rows)
    check_copies(records(out))


def test_dry_run_shows_the_requests_and_money_dedupe_saves(sim: Any, tmp_path: Path) -> None:
    """--dry-run counts the copies and prices them (standard and batch); with --no-dedupe it has no such line."""
    source = write_csv(tmp_path / "in.csv", repeated_rows(300))
    out = tmp_path / "out.jsonl"
    base = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--dry-run"]
    shown = cli(*base)
    assert shown.returncode == 0, shown.stderr
    assert "dedupe: 97 more rows repeat a text sent once" in shown.stdout
    assert "97 requests saved, ≈ $" in shown.stdout
    assert "(batch ≈ $" in shown.stdout  # what --engine batch saves, at its prices
    assert "203 rows to label" in shown.stdout
    plain = cli(*base, "--no-dedupe")
    assert "dedupe:" not in plain.stdout and "300 rows to label" in plain.stdout


def test_report_shows_copies_and_money_saved(sim: Any, tmp_path: Path) -> None:
    """The report counts the sink's copies and prices the requests they saved."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "in.csv", repeated_rows(60)), out)
    view = overview(out)
    assert view.copies == 17 and view.copy_saving is not None and view.copy_saving > 0
    page = write_report(tmp_path / "report.html", out).read_text(encoding="utf-8")
    assert "17 rows without a request" in page


def test_a_parquet_sink_without_copied_from_still_resumes(sim: Any, tmp_path: Path) -> None:
    """A Parquet sink written before copies were marked keeps its columns on resume; repeats are still sent once."""
    out = tmp_path / "out.parquet"
    label(sim, write_csv(tmp_path / "a.csv", reviews(20, "a")), out)
    for part in open_sink(out).parts():
        pq.write_table(pq.read_table(part).drop_columns(["copied_from"]), part)
    before = sim.stats()["requests"]
    later = repeated_rows(60)
    label(sim, write_csv(tmp_path / "b.csv", later), out)
    new_texts = {r[2] for r in later} - {r[2] for r in reviews(20, "a")}  # the others are copied from the sink
    assert sim.stats()["requests"] - before == len(new_texts) == 30
    assert len(set(sink_ids(out))) == 80


def test_the_batch_engine_submits_each_distinct_text_once_and_copies_the_rest(sim: Any, tmp_path: Path) -> None:
    """--engine batch: one request per distinct text; once collected, the repeats copy it; every id once; with
    --no-dedupe every row is submitted."""
    rows = repeated_rows(60)
    out = tmp_path / "out.jsonl"
    summary = label_batch(sim, write_csv(tmp_path / "in.csv", rows), out)
    distinct = len({text for _, _, text in rows})
    assert sum(Counter(sim.batch_summary()["submissions"]).values()) == distinct == 43
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(r[0] for r in rows)
    assert check_copies(recs) == 17 == summary.copies
    assert summary.labeled == 60
    label_batch(sim, write_csv(tmp_path / "in.csv", rows), tmp_path / "plain.jsonl", dedupe=False)
    assert sum(Counter(sim.batch_summary()["submissions"]).values()) == 43 + 60
    assert check_copies(records(tmp_path / "plain.jsonl")) == 0


def test_a_batch_run_that_does_not_wait_leaves_the_repeats_to_the_next_run(sim: Any, tmp_path: Path) -> None:
    """--no-wait submits the distinct texts only; the next run collects them, then copies the repeats: each id once."""
    rows = repeated_rows(60)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    first = label_batch(sim, source, out, wait=False)
    assert (first.copies == 0 and not out.exists()) or not records(out)
    label_batch(sim, source, out)
    assert sum(Counter(sim.batch_summary()["submissions"]).values()) == 43
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(r[0] for r in rows)
    assert check_copies(recs) == 17


def test_a_batch_run_copies_texts_the_sink_holds_without_submitting_them(sim: Any, tmp_path: Path) -> None:
    """--engine batch on an input whose texts an earlier run labeled (other ids): no request, a copy each."""
    out = tmp_path / "out.jsonl"
    label_batch(sim, write_csv(tmp_path / "a.csv", repeated_rows(30, "a")), out)
    before = sum(Counter(sim.batch_summary()["submissions"]).values())
    later = [(f"b{rid[1:]}", lang, text) for rid, lang, text in repeated_rows(30, "a")]
    summary = label_batch(sim, write_csv(tmp_path / "b.csv", later), out)
    assert sum(Counter(sim.batch_summary()["submissions"]).values()) == before
    assert summary.copies == 30 and len(set(sink_ids(out))) == 60
    assert check_copies(records(out)) == 30 + 30 - before


def test_a_shard_copies_texts_its_siblings_saved_before_it_started(sim: Any, tmp_path: Path) -> None:
    """A text an earlier run saved in one shard is copied, not sent, by the shard its rows now belong to (here:
    saved by id with --no-dedupe, resumed by text); every id lands once."""
    rows = [(f"p{i:03d}", "en", f"pair {i // 2}") for i in range(80)]  # each text twice
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    label(sim, source, out, shard=Shard(0, 2), dedupe=False)  # by id: half of the ids, most texts
    saved = {r[2] for r in rows if shard_of(r[0], 2) == 0}
    before = sim.stats()["requests"]
    for k in range(2):
        label(sim, source, out, shard=Shard(k, 2))
    assert sim.stats()["requests"] - before == len({r[2] for r in rows} - saved)
    ids = [r["id"] for sink in open_shards(out) for r in sink.iter_records(columns=["id"])]
    assert sorted(ids) == sorted(r[0] for r in rows)


VARIANTS = ["Great!", "  great!", "GREAT!  ", "좋아요  정말", "좋아요 정말"]


def variant_rows(n: int, prefix: str = "v") -> list[tuple[str, str, str]]:
    """n rows; every other row is one of five spellings of two texts (whitespace and case differ), the rest distinct."""
    unique = reviews(n, prefix)
    return [(rid, lang, VARIANTS[i // 2 % 5] if i % 2 == 0 else text) for i, (rid, lang, text) in enumerate(unique)]


def test_normalized_matching_sends_texts_equal_up_to_space_and_case_once(sim: Any, tmp_path: Path) -> None:
    """dedupe_match="normalized": 5 spellings of 2 texts in 50 of 100 rows cost 2 requests; exact would send 5."""
    rows = variant_rows(100)
    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", rows), out, dedupe_match="normalized")
    assert sim.stats()["requests"] == 52
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(r[0] for r in rows)
    assert check_copies(recs, exact=False) == 48 == summary.copies
    exact_out = tmp_path / "exact.jsonl"
    label(sim, write_csv(tmp_path / "in.csv", rows), exact_out)
    assert sim.stats()["requests"] == 52 + 55


def test_normalized_resume_finds_the_sink_record_through_an_exact_input_row(sim: Any, tmp_path: Path) -> None:
    """The sink keeps exact fingerprints: a later input with "Great!" once and other spellings of it sends none."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "a.csv", [("a1", "en", "Great!")]), out, dedupe_match="normalized")
    later = [("b1", "en", "great!"), ("b2", "en", "Great!"), ("b3", "en", " GREAT! ")]
    label(sim, write_csv(tmp_path / "b.csv", later), out, dedupe_match="normalized")
    assert sim.stats()["requests"] == 1
    recs = records(out)
    assert sorted(r["id"] for r in recs) == ["a1", "b1", "b2", "b3"]
    assert {r["id"]: r["copied_from"] for r in recs if r["id"] != "a1"} == {"b1": "a1", "b2": "a1", "b3": "a1"}


def test_normalized_resume_without_an_exact_row_sends_the_text_once(sim: Any, tmp_path: Path) -> None:
    """Only other spellings of a sink's text (none exact) are not matched to the sink: one request, then copies."""
    out = tmp_path / "out.jsonl"
    label(sim, write_csv(tmp_path / "a.csv", [("a1", "en", "Great!")]), out, dedupe_match="normalized")
    later = [("b1", "en", "great!"), ("b2", "en", " GREAT! ")]
    label(sim, write_csv(tmp_path / "b.csv", later), out, dedupe_match="normalized")
    assert sim.stats()["requests"] == 2
    assert check_copies(records(out), exact=False) == 1


def test_dedupe_normalized_flag_counts_the_copies_in_a_dry_run(sim: Any, tmp_path: Path) -> None:
    """--dedupe normalized on the command line: the dry run counts spellings of one text as copies."""
    source = write_csv(tmp_path / "in.csv", variant_rows(100))
    out = tmp_path / "out.jsonl"
    base = ["label", "--input", str(source), "--output", str(out), "--base-url", sim.base_url, "--dry-run"]
    shown = cli(*base, "--dedupe", "normalized")
    assert shown.returncode == 0, shown.stderr
    assert "dedupe: 48 more rows repeat a text sent once" in shown.stdout and "52 rows to label" in shown.stdout
    exact = cli(*base)
    assert "dedupe: 45 more rows" in exact.stdout and "55 rows to label" in exact.stdout


class Heard(io.StringIO):
    """A notice stream that tells when the run announced it is stopping (its Ctrl-C handler ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = threading.Event()

    def write(self, text: str) -> int:
        if "stopping" in text:
            self.stopping.set()
        return super().write(text)


def test_ctrl_c_during_the_dedupe_pass_is_handled_at_once_and_loses_nothing(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dedupe pass runs off the event loop: a SIGINT that arrives during it is handled while it runs, the
    pass stops reading, the run ends interrupted without a request, and the next run finishes every id once."""
    rows = repeated_rows(600)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    label(sim, source, out, max_rows=100)
    before = sim.stats()["requests"]
    notice = Heard()
    handled: list[bool] = []
    plan = Dedupe.plan

    def plan_under_ctrl_c(cls: type[Dedupe], *args: Any, **kwargs: Any) -> Dedupe:
        os.kill(os.getpid(), signal.SIGINT)
        handled.append(notice.stopping.wait(timeout=10))  # never, if the pass held the event loop
        return plan(*args, **kwargs)

    monkeypatch.setattr(Dedupe, "plan", classmethod(plan_under_ctrl_c))
    with pytest.raises(Interrupted):
        label(sim, source, out, notice=notice)
    assert handled == [True]
    assert sim.stats()["requests"] == before and len(sink_ids(out)) == 100
    monkeypatch.undo()
    label(sim, source, out)
    assert sorted(sink_ids(out)) == sorted(r[0] for r in rows)
    check_copies(records(out))
