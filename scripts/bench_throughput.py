"""Throughput benchmark: labelstream vs the seed design vs the bare SDK, against the simulator in its own process.

    python scripts/bench_throughput.py [--quick]

For each concurrency C at latency L the ideal is C/L rows per second; we report rows/s ÷ ideal, and
CPU per request against the bare-SDK floor (the pipeline should add ≤ 20% on top of the SDK call).
Bounded: every run has a row count and a timeout; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchlib import PY, labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    plan = [(10, 400 if args.quick else 2000), (100, 2000 if args.quick else 10_000)]
    print(f"# throughput at {args.latency_ms:g} ms simulated latency (ideal = concurrency / latency)")
    print("| design | concurrency | rows | elapsed s | rows/s | ÷ ideal | CPU ms/row | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", str(args.latency_ms)) as base_url:
        work = Path(tmp)
        for concurrency, rows in plan:
            source = make_csv(work / f"in-{rows}.csv", rows)
            ideal = concurrency / latency
            timeout = 5 * rows / ideal + 60
            runs = {
                "labelstream": labelstream_cmd(
                    source, work / f"out-{concurrency}.jsonl", base_url, "--concurrency", str(concurrency)
                ),
                "seed (gather+semaphore)": [
                    PY, "scripts/seed_baseline.py", str(source), str(work / f"seed-{concurrency}.json"),
                    "--base-url", base_url, "--max_concurrent", str(concurrency),
                ],
                "SDK alone, typed create()": [
                    PY, "scripts/sdk_floor.py", "--base-url", base_url, "--requests", str(rows),
                    "--concurrency", str(concurrency), "--mode", "typed",
                ],
                "SDK alone, low-level post()": [
                    PY, "scripts/sdk_floor.py", "--base-url", base_url, "--requests", str(rows),
                    "--concurrency", str(concurrency), "--mode", "post",
                ],
            }  # fmt: skip
            for design, cmd in runs.items():
                sim_reset(base_url)
                measured = run_child(cmd, timeout=timeout)
                served = int(sim_stats(base_url)["completed_ok"])  # type: ignore[call-overload]
                if measured.returncode not in (0, 1):
                    print(f"<!-- {design} failed: {measured.stderr[-500:]} -->")
                rate = served / measured.elapsed_s
                print(
                    f"| {design} | {concurrency} | {served} | {measured.elapsed_s:.1f} | {rate:.1f} | "
                    f"{rate / ideal:.2f} | {1000 * measured.cpu_s / max(served, 1):.2f} | {measured.peak_rss_mb:.0f} |",
                    flush=True,
                )
    print(json.dumps({"latency_ms": args.latency_ms}))


if __name__ == "__main__":
    main()
