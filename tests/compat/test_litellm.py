"""labelstream through a real LiteLLM proxy whose upstream is labelstream's simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.simulator import SimulatorConfig, SimulatorThread

from ..helpers import dead_letters, sink_ids
from .common import label_cli, records, sample_csv
from .servers import LiteLLM

KEY = LiteLLM.MASTER_KEY
MODEL = "gpt-4o-mini"


def test_labels_through_the_proxy(litellm: LiteLLM, upstream: SimulatorThread, tmp_path: Path) -> None:
    """Rows labeled through the proxy arrive once each, with confidence from the logprobs it passes on."""
    upstream.reset()
    inp = sample_csv(tmp_path / "in.csv", 30)
    out = tmp_path / "out.jsonl"
    done = label_cli(litellm.base_url, inp, out, "--concurrency", "8", model=MODEL, key=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = records(out)
    assert len(rows) == 30 == len(set(sink_ids(out)))
    assert all(r["confidence"] is not None for r in rows)
    sent = [r for r in rows if r.get("copied_from") is None]  # repeated texts are sent once (dedupe)
    assert upstream.stats(events=False)["requests"] >= len(sent) > 0


def test_bad_model_stops_with_exit_2(litellm: LiteLLM, tmp_path: Path) -> None:
    """A model the proxy does not route (LiteLLM says 400, not 404) stops the run: exit 2, its name, no dead letter."""
    inp = sample_csv(tmp_path / "in.csv", 6)
    out = tmp_path / "out.jsonl"
    wrong = label_cli(litellm.base_url, inp, out, model="gpt-4o-mni", key=KEY)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "gpt-4o-mni" in wrong.stderr
    assert dead_letters(out) == []
    right = label_cli(litellm.base_url, inp, out, model=MODEL, key=KEY)
    assert right.returncode == 0, right.stdout + right.stderr


def test_bad_key_stops_with_exit_2(litellm: LiteLLM, tmp_path: Path) -> None:
    """A key the proxy refuses stops the run with exit 2, no dead letter, and the key printed nowhere."""
    bad = "sk-compat-wrong-key-1234567890"
    inp = sample_csv(tmp_path / "in.csv", 6)
    out = tmp_path / "out.jsonl"
    done = label_cli(litellm.base_url, inp, out, model=MODEL, key=bad)
    assert done.returncode == 2, done.stdout + done.stderr
    assert dead_letters(out) == []
    assert bad not in done.stdout + done.stderr
    assert not any(bad in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def limited() -> Iterator[SimulatorThread]:
    """An upstream that allows 600 requests a minute, enforced over 2 s windows (20 per window)."""
    with SimulatorThread(SimulatorConfig(latency_ms=20, rpm=600, window_seconds=2)) as running:
        yield running


@pytest.fixture(scope="module")
def proxy_no_retries(limited: SimulatorThread, logs: Path) -> Iterator[LiteLLM]:
    """LiteLLM with `num_retries: 0`, the setting docs/rate-limits.md advises: upstream 429s come straight back."""
    with LiteLLM(logs / "litellm-no-retries.log", limited.base_url, num_retries=0) as proxy:
        yield proxy


def test_upstream_rate_limits_pass_through(proxy_no_retries: LiteLLM, limited: SimulatorThread, tmp_path: Path) -> None:
    """The simulator's 429s reach labelstream through the proxy; it paces to the limit and loses no row."""
    rows = 120
    inp = sample_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out.jsonl"
    done = label_cli(proxy_no_retries.base_url, inp, out, "--concurrency", "32", model=MODEL, key=KEY, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = sink_ids(out)
    assert len(ids) == rows == len(set(ids))
    stats = limited.stats(events=False)
    assert stats["rate_limited"]["requests"] > 0, stats
    assert "after 429" in done.stdout + done.stderr
    assert " 0 after 429" not in done.stdout + done.stderr
