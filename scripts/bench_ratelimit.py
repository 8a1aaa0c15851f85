"""Rate-limit benchmark: goodput against a strict, rate-limited simulator, with the seed design beside us.

    python scripts/bench_ratelimit.py                       # every scenario (about 25 minutes)
    python scripts/bench_ratelimit.py --quick               # the same scenarios, shortened (a few minutes)
    python scripts/bench_ratelimit.py --scenario high-tier,no-headers --no-seed-design

Scenarios (the simulator counts refused requests against the minute and holds each limit per second too):
    baseline     600 RPM, 200 ms, x-ratelimit-* headers            no flags
    high-tier    12,000 RPM, 3 s latency, headers                  no flags
    slow-model   1,200 RPM, 30 s latency, headers                  no flags
    no-headers   600 RPM, 200 ms, a bare 429 (no headers at all)   no flags
    retry-after  600 RPM, 200 ms, only retry-after on 429s         no flags
    rpm-given    600 RPM, 200 ms, no headers                       --rpm 600
    in-flight-2000  13,000 RPM, 10 s latency, headers              --concurrency 2000 (memory and CPU at 2,000)
    no-headers-1s   1,200 RPM over any 1 s, 200 ms, a bare 429      no flags
    no-headers-10s  1,200 RPM over any 10 s (Azure-style), no headers  no flags
    no-headers-60s  1,200 RPM over any 60 s, no headers             no flags

The three window scenarios hold the limit over one window only (`--window-seconds W --quantum 0`: R×W/60 requests
in any W seconds, a burst admitted whole), count refused requests, and say nothing. They are bounded by their row
count: 2,400 rows at 1,200 RPM take two minutes, two whole windows of 60 s, in real time (the window is not
shortened: the pacer's holds and pauses are in seconds, so shortening it would change the dynamics).

Measured per run: whole-run goodput (labeled rows per second ÷ the limit, process start to exit: it includes
the first round trip, spent learning the limit, and the last, spent waiting for the last replies); steady-state
goodput (the simulator's own timestamps of successes between the 20th and 80th percentile); the share of
requests answered 429; rows lost (input rows not labeled); and the time from the first request to 90% of the
limit (successes per second over a trailing second, or round trip if longer), in seconds and round trips.
The seed design (scripts/seed_baseline.py: gather + semaphore, no backoff) runs with as many in flight as
the limit needs (rate × latency), the concurrency its users would have tuned by hand. Bounded: each run has
a row count and a timeout; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchlib import PY, labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


@dataclass(frozen=True)
class Scenario:
    """One provider and one way of running against it."""

    name: str
    rpm: int
    latency_ms: float
    rows: int
    quick_rows: int
    headers: str = "full"
    flags: tuple[str, ...] = ()
    window_seconds: float = 60.0
    quantum: float = 1.0


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("baseline", 600, 200, 3000, 600),
        Scenario("high-tier", 12_000, 3000, 20_000, 4000),
        Scenario("slow-model", 1_200, 30_000, 12_000, 1500),
        Scenario("no-headers", 600, 200, 3000, 600, headers="none"),
        Scenario("retry-after", 600, 200, 3000, 600, headers="retry-after"),
        Scenario("rpm-given", 600, 200, 3000, 600, headers="none", flags=("--rpm", "600")),
        Scenario("in-flight-2000", 13_000, 10_000, 10_000, 3000, flags=("--concurrency", "2000")),
        Scenario("no-headers-1s", 1200, 200, 2400, 800, headers="none", window_seconds=1, quantum=0),
        Scenario("no-headers-10s", 1200, 200, 2400, 800, headers="none", window_seconds=10, quantum=0),
        Scenario("no-headers-60s", 1200, 200, 2400, 800, headers="none", window_seconds=60, quantum=0),
    )
}


def count_jsonl(path: Path) -> int:
    if not path.exists():
        return 0
    return len({json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line})


def successes(stats: dict[str, object]) -> list[float]:
    events: list[list[object]] = stats.get("events") or []  # type: ignore[assignment]
    return sorted(float(t) for t, status, _ in events if status == 200)  # type: ignore[arg-type]


def steady_goodput(times: list[float], rpm: int) -> str:
    """Successful requests per minute ÷ limit between 20% and 80% of them: the rate once ramped up."""
    if len(times) < 50:
        return "—"
    lo, hi = int(len(times) * 0.2), int(len(times) * 0.8)
    per_minute = (hi - lo) / (times[hi] - times[lo]) * 60
    return f"{per_minute / rpm:.2f}"


def time_to_90(times: list[float], first: float, rpm: int, latency_s: float) -> str:
    """Seconds (and round trips) from the first request until successes over a trailing window reach 90%."""
    window = max(1.0, latency_s)
    need = 0.9 * rpm / 60 * window
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        if i - j + 1 >= need:
            # The trailing window ending here is full: the rate was reached when the window began to count.
            reached = max(t - window, first) - first
            return f"{reached:.1f} s ({reached / latency_s:.1f} RTT)"
    return "never"


def refusals_at_start(stats: dict[str, object], first: float, seconds: float = 10.0) -> str:
    """429s in the first `seconds` after the first request, of all 429s: the slow start's overshoot vs the rest."""
    events: list[list[object]] = stats.get("events") or []  # type: ignore[assignment]
    refused = [float(t) for t, status, _ in events if status == 429]  # type: ignore[arg-type]
    return f"{sum(1 for t in refused if t < first + seconds)} of {len(refused)}"


def first_request(stats: dict[str, object]) -> float:
    events: list[list[object]] = stats.get("events") or []  # type: ignore[assignment]
    return min((float(e[0]) for e in events), default=0.0)  # type: ignore[arg-type]


def run(scenario: Scenario, rows: int, *, seed_design: bool, work: Path) -> None:
    latency_s = scenario.latency_ms / 1000
    sim_args = [
        "--latency-ms",
        str(scenario.latency_ms),
        "--rpm",
        str(scenario.rpm),
        "--rate-headers",
        scenario.headers,
        "--window-seconds",
        str(scenario.window_seconds),
        "--quantum",
        str(scenario.quantum),
    ]
    ideal_s = rows / (scenario.rpm / 60)
    in_flight = math.ceil(scenario.rpm / 60 * latency_s * 1.2)
    with simulator(*sim_args) as base_url:
        source = make_csv(work / f"{scenario.name}.csv", rows)
        designs = {"labelstream": None}
        if seed_design:
            designs["seed (gather+semaphore)"] = str(max(10, in_flight))
        for design, seed_concurrency in designs.items():
            sim_reset(base_url)
            out = work / f"{scenario.name}-{design[:4]}.jsonl"
            if seed_concurrency is None:
                cmd = labelstream_cmd(source, out, base_url, *scenario.flags)
                what = " ".join(scenario.flags) or "no flags"
            else:
                cmd = [PY, "scripts/seed_baseline.py", str(source), str(out.with_suffix(".json")),
                       "--base-url", base_url, "--max_concurrent", seed_concurrency]  # fmt: skip
                what = f"--max_concurrent {seed_concurrency}"
            measured = run_child(cmd, timeout=ideal_s * 3 + 4 * latency_s + 120)
            stats = sim_stats(base_url, events=True)
            by_status: dict[str, int] = stats["by_status"]  # type: ignore[assignment]
            requests = int(stats["requests"])  # type: ignore[call-overload]
            if seed_concurrency is None:
                saved = count_jsonl(out)
            else:
                result = out.with_suffix(".json")
                data = json.loads(result.read_text()) if result.exists() else []
                saved = sum(1 for r in data if r.get("label"))
            share = by_status.get("429", 0) / max(requests, 1)
            # Whole-run goodput only means something for a run that labeled everything: one that drops rows ends
            # early, inside the first window's allowance.
            goodput = f"{saved / measured.elapsed_s / (scenario.rpm / 60):.2f}" if saved == rows else "n/a (rows lost)"
            times = successes(stats)
            print(
                f"| {scenario.name} | {design} | {what} | {rows} | {measured.elapsed_s:.0f} | {goodput} | "
                f"{steady_goodput(times, scenario.rpm)} | {share:.1%} | {rows - saved} | "
                f"{refusals_at_start(stats, first_request(stats))} | "
                f"{time_to_90(times, first_request(stats), scenario.rpm, latency_s)} | "
                f"{measured.peak_rss_mb:.0f} | {measured.cpu_s / max(saved, 1) * 1000:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="fewer rows per scenario (a smoke run)")
    parser.add_argument("--seed-design", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    names = [n.strip() for n in args.scenario.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    print(
        "| scenario | design | flags | rows | elapsed s | whole-run goodput | steady-state goodput | 429 share "
        "| rows lost | 429s in the first 10 s | time to 90% of the limit | peak RSS MB | CPU ms/row |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            scenario = SCENARIOS[name]
            rows = scenario.quick_rows if args.quick else scenario.rows
            run(scenario, rows, seed_design=args.seed_design, work=Path(tmp))


if __name__ == "__main__":
    main()
