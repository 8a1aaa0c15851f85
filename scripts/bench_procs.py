"""Scaling benchmark: one process vs `--procs N` against a zero-latency simulator at concurrency 500.

    python scripts/bench_procs.py [--quick] [--procs 1,2] [--rows 20000] [--concurrency 500]

At zero latency the endpoint is never the bottleneck, so rows/s measures what labelstream's own CPU allows:
one process is bound by one core (the SDK's ~1.2 ms CPU a request is most of it); `--procs N` spreads the
work over N processes. The simulator runs in its own process on the same machine and needs CPU too, so on
a 2-core machine the speed-up of `--procs 2` is bounded by the simulator's share: the table shows the
simulator's CPU beside the client's. CPU is user+system time of the labelstream process and all its children.
`--procs 1` is the plain single-process run (no parent, no shards): what a user gets without the flag.
Bounded: a row count and a timeout per run; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchlib import labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3,000 rows: a smoke run of the script")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--output", default="jsonl", choices=["jsonl", "parquet"])
    args = parser.parse_args()
    rows = 3000 if args.quick else args.rows
    levels = [int(p) for p in args.procs.split(",")]
    print(f"# --procs scaling: {rows} rows, concurrency {args.concurrency} per process, 0 ms latency, {args.output}")
    print("| procs | elapsed s | rows/s | speed-up | client CPU ms/row | simulator CPU ms/row | exit |")
    print("|---|---|---|---|---|---|---|")
    base_rate = None
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", "0") as base_url:
        work = Path(tmp)
        source = make_csv(work / "in.csv", rows)
        for procs in levels:
            sim_reset(base_url)
            sim_cpu = float(sim_stats(base_url)["cpu_seconds"])  # type: ignore[arg-type]
            out = work / f"out-{procs}.{args.output}"
            extra = ["--concurrency", str(args.concurrency)] + (["--procs", str(procs)] if procs > 1 else [])
            measured = run_child(labelstream_cmd(source, out, base_url, *extra), timeout=rows / 50 + 120)
            stats = sim_stats(base_url)
            served = int(stats["completed_ok"])  # type: ignore[call-overload]
            sim_cpu = float(stats["cpu_seconds"]) - sim_cpu  # type: ignore[arg-type]
            rate = served / measured.elapsed_s
            base_rate = base_rate or rate
            print(
                f"| {procs} | {measured.elapsed_s:.1f} | {rate:.0f} | {rate / base_rate:.2f}× | "
                f"{1000 * measured.cpu_s / max(served, 1):.2f} | {1000 * sim_cpu / max(served, 1):.2f} | "
                f"{measured.returncode} |",
                flush=True,
            )
            if measured.returncode != 0:
                print(f"<!-- procs {procs}: {measured.stderr[-800:]} -->")
    print(json.dumps({"rows": rows, "concurrency": args.concurrency, "latency_ms": 0}))


if __name__ == "__main__":
    main()
