"""Flex processing on the online engine: service_tier on every request, a patient timeout, busy 429s ridden out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pipeline.api.client import LabelClient
from pipeline.cli import build_parser
from pipeline.commands.label import _run_options
from pipeline.ratelimit.limiter import Limiter, LimitSettings
from pipeline.results import Labeled, Row
from pipeline.task.prompt import Prompt

from .helpers import FAST_RETRY, SENTIMENT, cli, ids_once, label_args, reviews, write_csv

BUSY = {"kind": "status", "status": 429, "code": "resource_unavailable", "message": "flex is busy"}


def test_a_busy_flex_429_uses_no_retries_and_does_not_slow_the_run(sim: Any) -> None:
    """Six 429 resource_unavailable in a row (more than --max-retries): labeled; no pause, no smaller window."""
    limiter = Limiter(LimitSettings(concurrency=4))
    window = limiter.window

    async def one() -> Any:
        client = LabelClient(
            prompt=Prompt(SENTIMENT), limiter=limiter, model="gpt-4o-mini", api_key="sk-test-key",
            base_url=sim.base_url, retry=FAST_RETRY, service_tier="flex",
        )  # fmt: skip
        try:
            return await client.label(Row("r1", "배송이 빨라요", 1)), client.stats
        finally:
            await client.aclose()

    sim.script([{**BUSY, "count": 6}])
    result, stats = asyncio.run(one())
    assert isinstance(result, Labeled) and result.attempts == 7 > FAST_RETRY.max_attempts
    assert (stats.unavailable, stats.rate_limited) == (6, 0)
    assert limiter.pause_until == 0.0 and limiter.window >= window
    assert sim.stats()["by_status"] == {"200": 1, "429": 6}


def test_flex_requests_ride_out_resource_unavailable_at_half_price(sim: Any, tmp_path: Path) -> None:
    """--service-tier flex: 429 resource_unavailable is retried without counting as a rate limit; half price."""
    sim.configure(flex_unavailable_rate=0.3, seed=5, latency_ms=5)
    source = write_csv(tmp_path / "in.csv", reviews(40))
    out = tmp_path / "out.jsonl"
    flex = ("--service-tier", "flex", "--model", "o4-mini")  # gpt-4o-mini has no flex tier in the price table
    result = cli(*label_args(sim, source, out, *flex, "--concurrency", "4"))
    assert result.returncode == 0, result.stderr
    assert len(ids_once(out)) == 40
    stats = sim.stats()
    busy = stats["by_status"].get("429", 0)
    assert busy > 0 and stats["rate_limited"] == {"requests": 0, "tokens": 0}
    assert f"(0 after 429, {busy} after flex had no capacity)" in result.stderr
    assert "at flex prices" in result.stderr


def test_flex_waits_fifteen_minutes_for_a_reply_unless_told_otherwise() -> None:
    """--service-tier flex raises the per-request timeout to 900 s; an explicit --timeout still wins."""
    parser = build_parser()
    base = ["label", "--input", "in.csv"]
    flex = parser.parse_args([*base, "--service-tier", "flex"])
    assert _run_options(flex, []).retry.timeout == 900
    assert _run_options(parser.parse_args(base), []).retry.timeout == 60
    assert _run_options(parser.parse_args([*base, "--service-tier", "flex", "--timeout", "30"]), []).retry.timeout == 30
