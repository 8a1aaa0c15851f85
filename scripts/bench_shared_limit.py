"""Shared rate limit: 4 shards on one key against one RPM limit (the simulator's), each pacing at its share.

    python scripts/bench_shared_limit.py [--quick] [--rpm 600] [--rows 3000] [--shards 4] [--latency-ms 200]

The rows must be several times what one rate window lets through, or the whole run fits in the first window's
allowance and measures nothing: the full run takes ~5 minutes a design. `--quick` shortens the simulator's
window to 10 s (holding 1/6 of the per-minute limit; the headers still announce the per-minute limit).

Designs, each on the same input against the same limit:
- `--procs 4`: one parent, four shard children; each learns the limit from the headers and takes 1/4 of it.
- `4 × --shard k/4 --rpm R`: four independent processes (as on four machines), the key's limit given; each
  takes 1/4 of it because --shard with a limit implies the share.
- `--procs 4 --rate-share 1`: the baseline without sharing: each child believes the whole limit is its own,
  and only 429s and `x-ratelimit-remaining-*` hold them back.
Goodput = successful rows per minute ÷ the limit over the whole run; steady-state goodput between 20% and
80% of the successes (simulator timestamps); 429 share = 429s ÷ all requests. The target: 429s ≤ 5%,
goodput ≥ 0.9. Bounded: a row count and a timeout per run; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from bench_ratelimit import steady_goodput, successes
from benchlib import ROOT, labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


def separate_shards(source: Path, out: Path, base_url: str, *, shards: int, rpm: int, timeout: float) -> float:
    """Run shards 0 … N-1 as independent processes at once; return the wall time until the last ends."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            labelstream_cmd(source, out, base_url, "--shard", f"{k}/{shards}", "--rpm", str(rpm)),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k in range(shards)
    ]
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1,200 RPM, 10 s window, 1,000 rows: a smoke run")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    rpm, rows, window = (1200, 1000, 10.0) if args.quick else (args.rpm, args.rows, 60.0)
    n = args.shards
    print(
        f"# {n} shards, one key, {rpm} RPM limit (simulator, {window:g} s window), {rows} rows, "
        f"{args.latency_ms:g} ms latency"
    )
    print("| design | elapsed s | goodput (÷ limit) | steady-state goodput | requests | 429 share | rows labeled |")
    print("|---|---|---|---|---|---|---|")
    timeout = rows / rpm * 60 * 4 + 120
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--latency-ms", str(args.latency_ms), "--rpm", str(rpm), "--window-seconds", str(window)) as base_url,
    ):
        work = Path(tmp)
        source = make_csv(work / "in.csv", rows)
        designs = {
            f"--procs {n}": ["--procs", str(n)],
            f"{n} × --shard k/{n} --rpm {rpm}": None,
            f"--procs {n} --rate-share 1 (no sharing)": ["--procs", str(n), "--rate-share", "1"],
        }
        for i, (design, extra) in enumerate(designs.items()):
            sim_reset(base_url)  # also empties the rate window: each design starts with the whole limit
            out = work / f"out-{i}.jsonl"
            if extra is None:
                elapsed = separate_shards(source, out, base_url, shards=n, rpm=rpm, timeout=timeout)
            else:
                elapsed = run_child(labelstream_cmd(source, out, base_url, *extra), timeout=timeout).elapsed_s
            stats = sim_stats(base_url, events=True)
            by_status: dict[str, int] = stats["by_status"]  # type: ignore[assignment]
            requests = int(stats["requests"])  # type: ignore[call-overload]
            ok = by_status.get("200", 0)
            share = by_status.get("429", 0) / max(requests, 1)
            goodput = ok / (elapsed / 60) / rpm
            print(
                f"| {design} | {elapsed:.0f} | {goodput:.2f} | {steady_goodput(successes(stats), rpm)} | {requests} | "
                f"{share:.1%} | {ok} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
