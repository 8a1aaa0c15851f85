"""Defaults live in the library (`RunOptions.build`, what `label_csv` uses); the loopback rule is one function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import engines, label_csv
from pipeline.errors import UsageError
from pipeline.input.shards import Shard
from pipeline.ratelimit.limiter import LimitSettings, RetryPolicy
from pipeline.run.options import RunOptions, resolve_credentials
from pipeline.simulator.hosts import loopback_host
from pipeline.sinks import SinkMeta
from pipeline.sinks.progress_file import read_progress

from .helpers import FAST_RETRY, SENTIMENT, reviews, write_csv


@pytest.fixture
def options_of_label_csv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """label_csv(**kw) → the RunOptions it would run with (the run itself is left out)."""

    async def keep(opts: RunOptions) -> RunOptions:
        return opts

    monkeypatch.setattr(engines, "run_label", keep)
    source = write_csv(tmp_path / "in.csv", reviews(3))
    return lambda **kw: label_csv(source, tmp_path / "out.jsonl", SENTIMENT, **kw)


def test_flex_gets_the_long_timeout_from_the_library(options_of_label_csv: Any) -> None:
    """label_csv(service_tier="flex") waits 900 s a request, as the CLI does; a given timeout still wins."""
    assert options_of_label_csv().retry.timeout == 60.0
    assert options_of_label_csv(service_tier="flex").retry.timeout == 900.0
    assert options_of_label_csv(service_tier="flex", timeout=30).retry.timeout == 30.0
    given = options_of_label_csv(service_tier="flex", retry=RetryPolicy(max_attempts=2, timeout=5.0)).retry
    assert (given.max_attempts, given.timeout) == (2, 5.0)
    assert options_of_label_csv(max_retries=0).retry.max_attempts == 1


def test_a_shard_told_the_keys_limit_takes_its_part_from_the_library(options_of_label_csv: Any) -> None:
    """label_csv(shard=1/4, rpm) paces at 1/4 of the key, as the CLI does; without --rpm/--tpm, or given, as is."""
    shard = Shard(1, 4)
    assert options_of_label_csv(shard=shard, limits=LimitSettings.automatic(rpm=600)).limits.share == 0.25
    assert options_of_label_csv(shard=shard).limits.share == 1.0
    assert (
        options_of_label_csv(shard=shard, limits=LimitSettings.automatic(tpm=9e4), rate_share=0.5).limits.share == 0.5
    )


def test_a_sharded_library_run_writes_its_share(sim: Any, tmp_path: Path) -> None:
    """A real label_csv run of shard 0/2 under rpm=6000 paces at half the key (its progress file says 0.5)."""
    out = tmp_path / "out.jsonl"
    label_csv(
        write_csv(tmp_path / "in.csv", reviews(20)), out, SENTIMENT, base_url=sim.base_url, progress="off",
        retry=FAST_RETRY, shard=Shard(0, 2), limits=LimitSettings.automatic(rpm=6000),
    )  # fmt: skip
    doc = read_progress(SinkMeta(out, Shard(0, 2)).progress_path)
    assert doc is not None and doc["rate_share"] == 0.5


def test_exact_tokens_without_bpe_openai_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, options_of_label_csv: Any
) -> None:
    """--exact-tokens with bpe-openai missing says how to install it, instead of quietly estimating."""
    monkeypatch.setitem(sys.modules, "bpe_openai", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'labelstream\[tokens\]'"):
        options_of_label_csv(exact_tokens=True)


LOOPBACK = ["localhost", "127.0.0.1", "127.0.0.2", "127.255.1.9", "::1", "LOCALHOST"]
# "0.0.0.0" is every interface, not loopback: the simulator must refuse it.
REMOTE = ["10.0.0.1", "api.openai.com", "127.0.0.1.example.com", "0.0.0.0", "::", "128.0.0.1"]  # noqa: S104


@pytest.mark.parametrize("host", LOOPBACK)
def test_every_loopback_host_is_loopback_for_the_key_and_the_simulator(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All of 127.0.0.0/8, ::1 and localhost need no key, and the simulator may listen there."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    shown = f"[{host}]" if ":" in host else host
    assert resolve_credentials(None, f"http://{shown}:8000/v1")[0] == "sk-local-no-key"
    assert loopback_host(host)


@pytest.mark.parametrize("host", REMOTE)
def test_no_other_host_is_loopback(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other host needs a key, and the simulator refuses to listen there."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    shown = f"[{host}]" if ":" in host else host
    with pytest.raises(UsageError, match="OPENAI_API_KEY is not set"):
        resolve_credentials(None, f"http://{shown}:8000/v1")
    with pytest.raises(ValueError, match="only listens on loopback"):
        loopback_host(host)
