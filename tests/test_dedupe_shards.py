"""Dedupe across shards: identical texts land in one shard, and every id stays once when the rule changes
between runs (pipeline/run/sharding.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import SinkMismatchError
from pipeline.input.shards import Shard, key_shard, shard_of
from pipeline.results import text_sha
from pipeline.sinks import open_shards, open_sink

from .helpers import cli, label, label_args, reviews, start_cli, write_csv
from .test_dedupe import repeated_rows, variant_rows


def pairs(n: int) -> list[tuple[str, str, str]]:
    """n rows, each text twice under ids that mostly fall in different id-shards."""
    return [(f"p{i:03d}", "en", f"pair {i // 2}") for i in range(n)]


def shard_ids(output: Path) -> list[str]:
    """Every id of every shard of a sharded output (repeats kept, so a test can see them)."""
    return [str(r["id"]) for sink in open_shards(output) for r in sink.iter_records(columns=["id"])]


def check_once(output: Path, rows: list[tuple[str, str, str]]) -> None:
    """Every input id has exactly one record, and each copy names a record of the same text."""
    ids = shard_ids(output)
    assert sorted(ids) == sorted({r[0] for r in rows})
    texts = {rid: text for rid, _, text in rows}
    records = {str(r["id"]): r for sink in open_shards(output) for r in sink.iter_records()}
    for rec in records.values():
        if rec["copied_from"] is not None:
            assert texts[records[rec["copied_from"]]["id"]].casefold().split() == texts[rec["id"]].casefold().split()


def text_shard(text: str, count: int) -> int:
    """The shard of a text under exact matching (SENTIMENT sends the text as it is)."""
    return key_shard(int(text_sha(text), 16), count)


@pytest.mark.parametrize("launch", ["procs", "shard auto"])
def test_shards_side_by_side_send_each_distinct_text_once(sim: Any, tmp_path: Path, launch: str) -> None:
    """Three shards running at once over an input whose repeats fall in different id-shards: each distinct text
    is sent once in total, and every id gets exactly one record."""
    rows = pairs(120) + repeated_rows(180)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    assert any(shard_of(a[0], 3) != shard_of(b[0], 3) for a, b in zip(rows[::2], rows[1::2], strict=False))
    if launch == "procs":
        done = cli(*label_args(sim, source, out, "--procs", "3", "--concurrency", "4"))
        assert done.returncode == 0, done.stderr
    else:  # a Kubernetes Indexed Job: the index from the environment
        procs = [
            start_cli(*label_args(sim, source, out, "--shard", "auto", "--concurrency", "4"),
                      env={"JOB_COMPLETION_INDEX": str(k), "LABELSTREAM_SHARDS": "3"})
            for k in range(3)
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    assert sim.stats()["requests"] == len({text for _, _, text in rows})
    check_once(out, rows)


def test_no_dedupe_shards_then_dedupe_shards_label_each_id_once(sim: Any, tmp_path: Path) -> None:
    """Shards started by id (--no-dedupe, stopped by --limit) and resumed by text (dedupe on): a row done by
    the shard of its id is not labeled again by the shard of its text; every id ends with one record."""
    rows = repeated_rows(150)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.parquet"
    for k in range(2):
        label(sim, source, out, shard=Shard(k, 2), dedupe=False, max_rows=40)
    assert len(shard_ids(out)) == 80
    for k in range(2):
        assert label(sim, source, out, shard=Shard(k, 2)).exit_code == 0
    check_once(out, rows)
    for k in range(2):  # and back: by id again, nothing left to do
        assert label(sim, source, out, shard=Shard(k, 2), dedupe=False).labeled == 0
    check_once(out, rows)


def test_exact_then_normalized_shards_label_each_id_once(sim: Any, tmp_path: Path) -> None:
    """Shards of exact matching, stopped half-way, resumed with --dedupe normalized (other keys, other shards),
    then exact again: every id ends with one record."""
    rows = variant_rows(120)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    for k in range(3):
        label(sim, source, out, shard=Shard(k, 3), max_rows=15)
    for k in range(3):
        assert label(sim, source, out, shard=Shard(k, 3), dedupe_match="normalized").exit_code == 0
    check_once(out, rows)
    for k in range(3):
        assert label(sim, source, out, shard=Shard(k, 3)).labeled == 0
    check_once(out, rows)


def test_an_edited_row_whose_text_moves_shard_is_labeled_once(sim: Any, tmp_path: Path) -> None:
    """--relabel-changed when an edit sends a row's text to another shard: that shard skips the id while the old
    shard holds it, the old shard drops it, and the new shard's next run labels it; never twice."""
    rows = reviews(40)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    for k in range(2):
        label(sim, source, out, shard=Shard(k, 2))
    rid, lang, text = rows[0]
    old = text_shard(text, 2)
    new_text = next(f"{text} (edited {n})" for n in range(100) if text_shard(f"{text} (edited {n})", 2) != old)
    edited = write_csv(tmp_path / "edited.csv", [(rid, lang, new_text), *rows[1:]])
    first = label(sim, edited, out, shard=Shard(1 - old, 2), relabel_changed=True)
    assert first.labeled == 0 and first.changed == 1, "held by the old shard: skipped"
    dropped = label(sim, edited, out, shard=Shard(old, 2), relabel_changed=True)
    assert dropped.labeled == 0 and rid not in shard_ids(out)
    assert dropped.unfinished == 1 and dropped.exit_code == 1, "not all labeled until the new shard runs"
    again = label(sim, edited, out, shard=Shard(1 - old, 2), relabel_changed=True)
    assert again.labeled == 1
    assert sorted(shard_ids(out)) == sorted(r[0] for r in rows)
    record = next(r for r in open_sink(out, Shard(1 - old, 2)).iter_records() if r["id"] == rid)
    assert record["text_sha"] == text_sha(new_text)


def test_a_shard_is_refused_beside_a_running_sibling_that_shards_by_another_rule(sim: Any, tmp_path: Path) -> None:
    """While shard 0/2 runs by id (--no-dedupe), shard 1/2 by text is refused with what to do; once shard 0 has
    ended, the switch is allowed."""
    rows = repeated_rows(60)
    source, out = write_csv(tmp_path / "in.csv", rows), tmp_path / "out.jsonl"
    label(sim, source, out, shard=Shard(0, 2), dedupe=False, max_rows=10)
    sibling = open_sink(out, Shard(0, 2)).meta
    sibling.lock()  # shard 0 is running
    try:
        with pytest.raises(SinkMismatchError, match=r"shard 0/2 .* running with rows sharded by id \(--no-dedupe\)"):
            label(sim, source, out, shard=Shard(1, 2))
    finally:
        sibling.unlock()
    for k in (1, 0):
        assert label(sim, source, out, shard=Shard(k, 2)).exit_code == 0
    check_once(out, rows)
