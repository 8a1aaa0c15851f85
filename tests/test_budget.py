"""--max-cost: refused before any request when the estimate is over it; a clean, resumable stop before passing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.api.pricing import cost_of
from pipeline.input.shards import Shard, key_shard
from pipeline.results import text_sha
from pipeline.run.estimate import estimate_run
from pipeline.run.options import RunOptions
from pipeline.run.prepare import prepare_run
from pipeline.sinks import SinkMeta, open_shards, open_sink
from pipeline.sinks.progress_file import read_progress
from pipeline.task.config import load_config

from .helpers import ROOT, cli, progress, reviews, sink_ids, write_csv
from .test_cli import label_args


def reasoning_task(tmp_path: Path) -> Path:
    """The sentiment task with room for a reasoning model's hidden tokens (max_tokens 200)."""
    text = (
        (ROOT / "configs" / "sentiment.toml").read_text(encoding="utf-8").replace("max_tokens = 20", "max_tokens = 200")
    )
    path = tmp_path / "sentiment-reasoning.toml"
    path.write_text(text, encoding="utf-8")
    return path


def estimated_cost(source: Path, output: Path, config: Path) -> float:
    """What the run's own pre-start check will estimate for this input and sink."""
    opts = RunOptions.build(source, output, load_config(config))
    prepared = prepare_run(opts, dry_run=True)
    try:
        cost = estimate_run(opts, prepared, exact=False).cost
    finally:
        prepared.close()
    assert cost is not None
    return cost


def spent(output: Path, shard: Shard | None = None) -> float:
    """What the rows in a sink (or one shard of it) cost by their own usage."""
    total = 0.0
    for r in open_sink(output, shard).iter_records():
        cost = cost_of(r["model"], r["prompt_tokens"], r["completion_tokens"], cached_tokens=r["cached_tokens"] or 0)
        total += cost or 0.0
    return total


def test_an_estimate_over_the_limit_refuses_to_start(sim: Any, tmp_path: Path) -> None:
    """With the estimate above --max-cost the run exits 4 before any request, saying by how much and what to do."""
    source = write_csv(tmp_path / "in.csv", reviews(50))
    out = tmp_path / "out.jsonl"
    result = cli(*label_args(sim, source, out, "--max-cost", "0.0001"))
    assert result.returncode == 4, result.stderr
    assert "exceeds --max-cost $0.0001; nothing was sent" in result.stderr
    assert "--limit N" in result.stderr
    assert sim.stats()["requests"] == 0
    assert sink_ids(out) == []


def test_max_cost_needs_a_price(sim: Any, tmp_path: Path) -> None:
    """--max-cost with a model the price table does not know is a usage error, before any request."""
    source = write_csv(tmp_path / "in.csv", reviews(5))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--max-cost", "1", "--model", "my-llama"))
    assert result.returncode == 2
    assert "--max-cost needs a price for my-llama" in result.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_a_budget_stop_mid_run_is_flushed_and_a_resume_finishes_exactly_once(
    sim: Any, tmp_path: Path, name: str
) -> None:
    """Replies that cost more than estimated (hidden reasoning tokens) stop the run before it passes --max-cost,
    counting requests in flight at their worst case: exit 4, every finished row saved, the spend within the limit.
    The same command with a higher limit then labels the rest, each row exactly once."""
    rows = reviews(200)
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / name
    config = reasoning_task(tmp_path)
    sim.configure(reasoning_tokens=150)
    limit = round(estimated_cost(source, out, config) * 1.2, 6)
    first = cli(*label_args(sim, source, out, "--config", str(config), "--max-cost", f"{limit}", "--concurrency", "8"))
    assert first.returncode == 4, first.stderr
    assert f"rows: within --max-cost ${limit:g}" in first.stderr  # the estimate passed: the run started
    assert f"stopped at --max-cost ${limit:g}" in first.stderr
    assert "raise --max-cost" in first.stderr and "labelstream label" in first.stderr
    saved = sink_ids(out)
    assert 0 < len(saved) < len(rows)
    assert len(set(saved)) == len(saved)
    assert spent(out) <= limit
    assert progress(out)["state"] == "budget"
    assert progress(out)["summary"]["labeled"] == len(saved)

    second = cli(*label_args(sim, source, out, "--config", str(config), "--max-cost", "1"))
    assert second.returncode == 0, second.stderr
    final = sink_ids(out)
    assert sorted(final) == sorted(r[0] for r in rows)
    assert len(final) == len(set(final))


@pytest.mark.slow
def test_procs_share_one_budget(sim: Any, tmp_path: Path) -> None:
    """--procs 2 --max-cost X: the two shards together spend at most X (each stops at its half), exit 4 once."""
    source = write_csv(tmp_path / "in.csv", reviews(300))
    out = tmp_path / "out.jsonl"
    config = reasoning_task(tmp_path)
    sim.configure(reasoning_tokens=150)
    limit = round(estimated_cost(source, out, config) * 1.2, 6)
    args = label_args(sim, source, out, "--config", str(config), "--max-cost", f"{limit}", "--procs", "2")
    result = cli(*args, "--concurrency", "8")
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("labelstream stopped at --max-cost: ") == 1, result.stderr
    assert f"of --max-cost ${limit:g}" in result.stderr
    assert result.stderr.count(f"stopped before passing --max-cost ${limit:g} (each of the 2 shards") == 1
    shards = [read_progress(SinkMeta(out, Shard(k, 2)).progress_path) or {} for k in range(2)]
    assert [doc.get("state") for doc in shards] == ["budget", "budget"]
    assert sum(doc["summary"]["cost_usd"] for doc in shards) <= limit
    assert sum(spent(sink.output, sink.shard) for sink in open_shards(out)) <= limit


def test_procs_refuse_a_run_over_the_cap_once(sim: Any, tmp_path: Path) -> None:
    """--procs 2 with the run's estimate over --max-cost: one refusal for the whole run, no child, no request."""
    source = write_csv(tmp_path / "in.csv", reviews(50))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--max-cost", "0.0001", "--procs", "2"))
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("exceeds --max-cost $0.0001; nothing was sent") == 1, result.stderr
    assert "[shard" not in result.stderr
    assert sim.stats()["requests"] == 0


@pytest.mark.slow
def test_procs_split_the_cap_by_each_shards_work(sim: Any, tmp_path: Path) -> None:
    """All rows in one shard: it gets the cap (not half of it), so a run within --max-cost is labeled whole."""
    rows = [r for r in reviews(400) if key_shard(int(text_sha(r[2]), 16), 2) == 0][:60]  # by text: dedupe is on
    source = write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    limit = round(estimated_cost(source, out, ROOT / "configs" / "sentiment.toml") * 1.5, 6)
    result = cli(*label_args(sim, source, out, "--max-cost", f"{limit}", "--procs", "2"))
    assert result.returncode == 0, result.stderr
    labeled = [r["id"] for sink in open_shards(out) for r in sink.iter_records(columns=["id"])]
    assert sorted(labeled) == sorted(r[0] for r in rows)
