"""Rate-limit benchmark: goodput under an RPM-limited simulator, with no --rpm given, vs the seed design.

    python scripts/bench_ratelimit.py [--rpm 600] [--rows 3000] [--latency-ms 200] [--concurrency 10,50,500,auto]
    python scripts/bench_ratelimit.py --latency-ms 3000 --rows 1500 --concurrency 10,auto   # the slow-model case

Goodput = successful rows per minute ÷ the limit, over the whole run (process start to exit).
429 share = requests answered 429 ÷ all requests the simulator saw. Rows lost = input rows not in the output
after the run (labelstream keeps failed rows in its dead-letter file and retries them on the next run; the seed
design drops them). Bounded: each run has a row count and a timeout; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchlib import PY, labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator


def count_jsonl(path: Path) -> int:
    if not path.exists():
        return 0
    return len({json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line})


def steady_goodput(stats: dict[str, object], rpm: int) -> str:
    """Successful requests per minute ÷ limit between 20% and 80% of them: the rate once ramped up."""
    events: list[list[object]] = stats.get("events") or []  # type: ignore[assignment]
    times = sorted(float(t) for t, status, _ in events if status == 200)  # type: ignore[arg-type]
    if len(times) < 50:
        return "—"
    lo, hi = int(len(times) * 0.2), int(len(times) * 0.8)
    per_minute = (hi - lo) / (times[hi] - times[lo]) * 60
    return f"{per_minute / rpm:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", default="10,50,500,auto")
    parser.add_argument("--seed-design", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    levels = [c.strip() for c in args.concurrency.split(",")]
    print(f"# goodput at {args.rpm} RPM (simulator), {args.rows} rows, {args.latency_ms:g} ms latency, no --rpm given")
    print(
        "| design | concurrency | elapsed s | rows/min | goodput (÷ limit) | steady-state goodput "
        "| requests | 429 share | rows lost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ideal_minutes = args.rows / args.rpm
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--latency-ms", str(args.latency_ms), "--rpm", str(args.rpm)) as base_url,
    ):
        work = Path(tmp)
        source = make_csv(work / "in.csv", args.rows)
        for level in levels:
            designs = {"labelstream": level}
            if args.seed_design and level != "auto":
                designs["seed (gather+semaphore)"] = level
            for design, concurrency in designs.items():
                sim_reset(base_url)
                out = work / f"{design[:4]}-{concurrency}.jsonl"
                if design == "labelstream":
                    cmd = labelstream_cmd(source, out, base_url, "--concurrency", concurrency)
                else:
                    cmd = [PY, "scripts/seed_baseline.py", str(source), str(out.with_suffix(".json")),
                           "--base-url", base_url, "--max_concurrent", concurrency]  # fmt: skip
                measured = run_child(cmd, timeout=ideal_minutes * 60 * 4 + 120)
                stats = sim_stats(base_url, events=True)
                by_status: dict[str, int] = stats["by_status"]  # type: ignore[assignment]
                requests = int(stats["requests"])  # type: ignore[call-overload]
                if design == "labelstream":
                    saved = count_jsonl(out)
                else:
                    result = out.with_suffix(".json")
                    data = json.loads(result.read_text()) if result.exists() else []
                    saved = sum(1 for r in data if r.get("label"))
                minutes = measured.elapsed_s / 60
                share = by_status.get("429", 0) / max(requests, 1)
                # Goodput is only meaningful for a run that labeled everything: a run that drops rows ends
                # early, inside the first window's burst allowance.
                goodput = f"{saved / minutes / args.rpm:.2f}" if saved == args.rows else "n/a (rows lost)"
                print(
                    f"| {design} | {concurrency} | {measured.elapsed_s:.0f} | {saved / minutes:.0f} | "
                    f"{goodput} | {steady_goodput(stats, args.rpm)} | {requests} | {share:.1%} | {args.rows - saved} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
