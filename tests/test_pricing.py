"""The price table, and what --dry-run says about tokens, cost per tier and time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.api.pricing import PRICES_ENV, cost_of, load_prices, parse_prices, price_of
from pipeline.errors import ConfigError
from pipeline.sinks import open_sink
from pipeline.task.prompt import Prompt

from .helpers import SENTIMENT, cli, label, progress, reviews, write_csv
from .test_cli import label_args


def test_cost_of_prices_cached_input_and_tiers() -> None:
    """cost_of keeps its call shape and adds tier= and cached_tokens= (cached input at its own price)."""
    assert cost_of("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert cost_of("gpt-4o-mini", 1_000_000, 0, cached_tokens=400_000) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075)
    assert cost_of("gpt-4o-mini", 1_000_000, 1_000_000, tier="batch") == pytest.approx((0.15 + 0.60) / 2)
    assert cost_of("gpt-5-mini", 1_000_000, 0, tier="flex") == pytest.approx(0.125)
    assert cost_of("gpt-4o-mini", 1000, 0, tier="flex") is None  # not offered for that model
    assert cost_of("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
    assert cost_of("my-llama", 1000, 1000) is None
    with pytest.raises(ValueError, match="unknown service tier"):
        cost_of("gpt-4o-mini", 1, 1, tier="priority")


def test_the_bundled_table_is_dated_and_names_its_source() -> None:
    """configs/prices.toml says when its prices were taken and where from."""
    table = load_prices()
    assert table.as_of and re.fullmatch(r"\d{4}-\d{2}-\d{2}", table.as_of)
    assert table.source and "openai.com" in table.source
    assert price_of("gpt-4o-mini") is not None


def test_an_edited_price_file_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$LABELSTREAM_PRICES points at another table; its prices and tier multipliers rule."""
    prices = tmp_path / "prices.toml"
    prices.write_text(
        'as_of = "2030-01-01"\nsource = "our contract"\n[tiers]\nbatch = 0.4\n'
        "[models.my-llama]\ninput = 1.0\noutput = 2.0\n",
        encoding="utf-8",
    )
    monkeypatch.setenv(PRICES_ENV, str(prices))
    assert cost_of("my-llama", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert cost_of("my-llama", 1_000_000, 0, cached_tokens=1_000_000) == pytest.approx(1.0)  # no cached price
    assert cost_of("my-llama", 1_000_000, 1_000_000, tier="batch") == pytest.approx(1.2)
    assert cost_of("gpt-4o-mini", 1, 1) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"models": {"m": {"input": -1, "output": 1}}}, "input must be a price"),
        ({"models": {"m": {"input": 1, "output": 1, "cache": 1}}}, "unknown key 'cache'"),
        ({"tiers": {"batch": 2000}}, "multiplier"),
        ({"models": {"m": "cheap"}}, "must be a table"),
    ],
)
def test_a_broken_price_table_names_the_key(raw: dict[str, Any], message: str) -> None:
    """Invalid prices are a ConfigError that names the key and what is allowed."""
    with pytest.raises(ConfigError, match=message):
        parse_prices(raw)


def test_dry_run_shows_exact_tokens_cost_per_tier_and_time(sim: Any, tmp_path: Path) -> None:
    """--dry-run counts prompt tokens exactly with bpe-openai, prices online, batch and flex, and gives the time
    at --rpm; nothing is sent."""
    source = write_csv(tmp_path / "in.csv", reviews(40))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--dry-run", "--rpm", "60", "--model", "gpt-5-mini"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "prompt: exact, counted with bpe-openai (o200k_base)" in out
    costs = re.search(r"cost: standard \$(\S+), batch \$(\S+), flex \$(\S+)", out)
    assert costs is not None, out
    standard, batch, flex = (float(x) for x in costs.groups())
    assert standard > 0 and batch == pytest.approx(standard / 2, abs=1e-4) and flex == pytest.approx(batch, abs=1e-4)
    assert "expected time: ~42s (bound by --rpm 60)" in out  # 40 rows at 95% of 60 a minute
    assert sim.stats()["requests"] == 0


def test_dry_run_for_an_unpriced_model_shows_tokens_and_says_no_price(sim: Any, tmp_path: Path) -> None:
    """A model missing from the table still gets its tokens counted (by the character estimate) and "no price"."""
    source = write_csv(tmp_path / "in.csv", reviews(10))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--dry-run", "--model", "my-llama"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"~[\d,]+ prompt \+ ~[\d,]+ completion tokens", result.stdout)
    assert "prompt: character estimate, not yet calibrated by a run" in result.stdout
    assert "cost: no price for my-llama" in result.stdout


def test_dry_run_after_a_run_calibrates_from_usage_and_the_sink(sim: Any, tmp_path: Path) -> None:
    """After a run, the character estimate is scaled by the provider's own counts, and completion sizes and
    latency come from the rows in the sink."""
    source = write_csv(tmp_path / "in.csv", reviews(60))
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, source, out, "--model", "my-llama", "--limit", "30")).returncode == 0
    result = cli(*label_args(sim, source, out, "--dry-run", "--model", "my-llama"))
    assert result.returncode == 0, result.stderr
    assert "30 rows to label, 30 already in the sink" in result.stdout
    assert re.search(r"calibrated estimate: characters scaled ×\d\.\d\d by the last run's usage", result.stdout)
    assert "as in the 30 rows already in the sink" in result.stdout
    assert "a request, as in the sink" in result.stdout


def test_a_missing_price_file_is_a_usage_error(sim: Any, tmp_path: Path) -> None:
    """--prices naming no file stops before any work with a message saying what to pass."""
    source = write_csv(tmp_path / "in.csv", reviews(3))
    result = cli(*label_args(sim, source, tmp_path / "out.jsonl", "--prices", str(tmp_path / "nope.toml")))
    assert result.returncode == 2
    assert "price file" in result.stderr and "not found" in result.stderr
    assert sim.stats()["requests"] == 0


def test_the_shared_prompt_comes_first_so_provider_caching_applies(sim: Any, tmp_path: Path) -> None:
    """Every request starts with the same messages and ends with the row's text, so a provider caches the shared
    part: the simulator reports cached tokens from the second request on, the live cost prices them at the cached
    rate, and the summary shows the cache-hit share."""
    long = SENTIMENT.with_overrides(instructions=SENTIMENT.instructions + " Judge the whole text." * 300)
    prompt = Prompt(long)
    first, second = prompt.messages("first row"), prompt.messages("second row")
    assert first[:-1] == second[:-1] and first[-1]["content"] == "first row"
    assert not any("first row" in m["content"] for m in first[:-1])

    out = tmp_path / "out.jsonl"
    summary = label(sim, write_csv(tmp_path / "in.csv", reviews(30)), out, config=long, concurrency=2)
    records = list(open_sink(out).iter_records())
    assert sum(r["cached_tokens"] > 0 for r in records) >= 28  # all but the first request or two
    assert all(r["cached_tokens"] <= r["prompt_tokens"] for r in records)
    assert summary.cache_hit_share > 0.5
    assert f"({summary.cache_hit_share:.0%} from the prompt cache)" in summary.render()
    uncached = cost_of("gpt-4o-mini", summary.prompt_tokens, summary.completion_tokens)
    assert summary.cost_usd is not None and uncached is not None
    assert summary.cost_usd < 0.7 * uncached
    assert progress(out)["cached_tokens"] == sum(r["cached_tokens"] for r in records)
