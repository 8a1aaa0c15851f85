"""Memory benchmark: peak RSS labeling 10k vs 1M rows, both sinks, against a zero-latency simulator.

    python scripts/bench_memory.py [--big 1000000] [--small 10000] [--seed-cap-s 180] [--engine online|batch]

labelstream's RSS should not grow with the input: the target is 1M-row peak ≤ 1.2× the 10k-row peak and
< 250 MB. The seed design (read everything, one task per row, results in memory) runs on the same input
beside it; since it would need most of an hour for a million rows, it is stopped after --seed-cap-s and its
peak so far is reported as a lower bound. Peak RSS is the kernel's high-water mark (VmHWM) of the process.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchlib import PY, labelstream_cmd, make_csv, run_child, sim_reset, simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=1_000_000)
    parser.add_argument("--concurrency", default="100")
    parser.add_argument("--seed-cap-s", type=float, default=180.0)
    parser.add_argument("--sinks", default="jsonl,parquet")
    parser.add_argument("--seed-design", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--engine", choices=["online", "batch"], default="online", help="batch: via the Batch API")
    args = parser.parse_args()
    engine = ["--engine", "batch", "--poll-interval", "0.5"] if args.engine == "batch" else []
    print(f"# peak RSS, zero-latency simulator, --concurrency {args.concurrency}, --engine {args.engine}")
    print("| design | sink | rows | elapsed s | rows/s | peak RSS MB | ÷ small run |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", "0") as base_url:
        work = Path(tmp)
        inputs = {n: make_csv(work / f"in-{n}.csv", n) for n in (args.small, args.big)}
        for sink in args.sinks.split(","):
            small_peak = None
            for rows, source in inputs.items():
                sim_reset(base_url)
                out = work / f"out-{rows}.{sink}"
                cmd = labelstream_cmd(source, out, base_url, "--concurrency", args.concurrency, *engine)
                measured = run_child(cmd, timeout=rows * 0.01 + 600)
                small_peak = small_peak or measured.peak_rss_mb
                status = "" if measured.returncode == 0 else f" (exit {measured.returncode})"
                print(
                    f"| labelstream | {sink} | {rows:,} | {measured.elapsed_s:.0f} | {rows / measured.elapsed_s:.0f} | "
                    f"{measured.peak_rss_mb:.1f}{status} | {measured.peak_rss_mb / small_peak:.2f} |",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
                out.unlink(missing_ok=True)
        for rows, source in inputs.items() if args.seed_design else ():
            sim_reset(base_url)
            cmd = [PY, "scripts/seed_baseline.py", str(source), str(work / "seed.json"),
                   "--base-url", base_url, "--max_concurrent", args.concurrency]  # fmt: skip
            measured = run_child(cmd, timeout=args.seed_cap_s)
            finished = measured.returncode == 0
            label = (
                f"{measured.peak_rss_mb:.1f}"
                if finished
                else f"≥ {measured.peak_rss_mb:.1f} (stopped at {args.seed_cap_s:.0f} s)"
            )
            print(
                f"| seed (gather+semaphore) | json at end | {rows:,} | {measured.elapsed_s:.0f} | — | {label} | |",
                flush=True,
            )


if __name__ == "__main__":
    main()
