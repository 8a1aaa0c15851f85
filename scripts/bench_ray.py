"""Ray engine benchmark: goodput under one shared limit, and what a kill -9 makes you pay again.

    python scripts/bench_ray.py [--quick] [--rows 6000] [--rpm 6000] [--latency-ms 500] [--actors 2]

1. Goodput: the same input against a simulator enforcing `--rpm` (per second too, as OpenAI does), labeled by
   `--engine ray --ray-actors N` with the limit given, and by the default online engine in one process beside
   it. Goodput = labeled rows per minute ÷ the limit, whole run (process start to exit, Ray's start-up
   included) and steady state (simulator timestamps of successes between the 20th and 80th percentile).
2. Crash cost: `--engine ray` killed with its whole process group (kill -9) once its first part is written,
   then re-run to the end. Re-paid = successful replies of both runs beyond one per row; the output must hold
   every row exactly once.
Bounded: fixed row counts, a timeout per run; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
from bench_ratelimit import steady_goodput
from benchlib import ROOT, labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


def goodput(source: Path, out: Path, base_url: str, *, rpm: int, rows: int, extra: list[str]) -> str:
    sim_reset(base_url)
    run = run_child(labelstream_cmd(source, out, base_url, "--rpm", str(rpm), *extra), timeout=1800)
    stats = sim_stats(base_url, events=True)
    times = sorted(t for t, status, _ in stats["events"] if status == 200)  # type: ignore[union-attr]
    refused = stats["by_status"].get("429", 0)  # type: ignore[union-attr]
    whole = rows / run.elapsed_s * 60 / rpm
    return (
        f"| {' '.join(extra) or 'online (1 process)'} | {run.elapsed_s:.0f} | {whole:.2f} | "
        f"{steady_goodput(times, rpm)} | {refused / max(1, stats['requests']):.1%} | {run.returncode} |"  # type: ignore[operator]
    )


def crash_cost(source: Path, out: Path, base_url: str, rows: int, extra: list[str]) -> str:
    sim_reset(base_url)
    cmd = labelstream_cmd(source, out, base_url, "--engine", "ray", *extra)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out.is_dir() and any(out.iterdir())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the run ended (or hung) before writing its first part")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(pads.dataset(out).to_table(columns=["id"]))
    received = sim_stats(base_url)["completed_ok"]
    resumed = run_child(cmd, timeout=1800)
    ids = pads.dataset(out).to_table(columns=["id"]).column("id").to_pylist()
    repaid = int(sim_stats(base_url)["completed_ok"]) - rows  # type: ignore[call-overload]
    once = len(ids) == len(set(ids)) == rows
    return f"| {' '.join(extra)} | {first} | {received} | {repaid} | {'yes' if once else 'NO'} | {resumed.returncode} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,500 rows at 3,000 RPM")
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    rows, rpm = (1500, 3000) if args.quick else (args.rows, args.rpm)
    concurrency = str(max(8, int(rpm / 60 * args.latency_ms / 1000 * 2)))
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--rpm", str(rpm), "--latency-ms", str(args.latency_ms)) as url,
    ):
        source = make_csv(Path(tmp) / "in.csv", rows)
        print(f"{rows:,} rows, {rpm:,} RPM, {args.latency_ms:g} ms, concurrency {concurrency}\n")
        print("| engine | elapsed s | goodput (÷ limit) | steady-state goodput | 429 share | exit |")
        print("|---|---|---|---|---|---|")
        print(
            goodput(source, Path(tmp) / "online.parquet", url, rpm=rpm, rows=rows, extra=["--concurrency", concurrency])
        )
        ray_flags = ["--engine", "ray", "--ray-actors", str(args.actors), "--concurrency", concurrency]
        print(goodput(source, Path(tmp) / "ray.parquet", url, rpm=rpm, rows=rows, extra=ray_flags))
        print("\n| kill -9 of | rows written before | replies received before | re-paid | each row once | exit |")
        print("|---|---|---|---|---|---|")
        flags = ["--ray-actors", str(args.actors), "--concurrency", concurrency, "--rpm", str(rpm)]
        print(crash_cost(source, Path(tmp) / "crash.parquet", url, rows, flags))


if __name__ == "__main__":
    main()
