"""Soak benchmark: a long run against a faulty provider, with the same run without faults as the yardstick.

    python scripts/bench_soak.py                  # 50,000 rows at 50 ms (a few minutes a run)
    python scripts/bench_soak.py --quick          # 5,000 rows
    python scripts/bench_soak.py --rows 20000 --hang-rate 0.002 --hang-first --no-seed-design   # issue 19, item 6
    python scripts/bench_soak.py --rows 20000 --hang-rate 0.002 --hang-late --no-seed-design    # a late straggler

Faults: 1% HTTP 500s, 0.1% requests that never get an answer, 2% unusable replies (the simulator's
--error-rate, --hang-rate, --malformed-rate). Measured: wall time with faults ÷ wall time without (target
≤ 1.2), rows lost (input ids not in the sink), duplicates (ids in the sink more than once). The seed design
(gather + semaphore, the SDK's own 60 s timeout, no retries of its own) runs the same two inputs beside us.
Bounded: rows and a timeout per run; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

from benchlib import PY, labelstream_cmd, make_csv, run_child, sim_stats, simulator


def hang_next_request(base_url: str) -> None:
    """Script the simulator to hold the next request it gets (before the run starts: its first, sent unlearned)."""
    root = base_url.removesuffix("/v1")
    body = json.dumps({"faults": [{"kind": "hang", "count": 1}]}).encode()
    request = urllib.request.Request(f"{root}/control/faults", method="POST", data=body)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback only
        pass


def hang_late_request(base_url: str, rows: int, stop: threading.Event) -> None:
    """Once the simulator has seen `rows` requests (about 97% through, with the faults' retries), hold the next."""
    while not stop.is_set():
        if int(sim_stats(base_url)["requests"]) >= rows:  # type: ignore[call-overload]
            hang_next_request(base_url)
            return
        stop.wait(0.05)


def faults(hang_rate: float) -> tuple[str, ...]:
    return ("--error-rate", "0.01", "--hang-rate", f"{hang_rate:g}", "--malformed-rate", "0.02")


def sink_counts(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line)


def last_row_wait(path: Path) -> str:
    """Seconds between the last two rows labeled: how long the run's end waited for its last straggler."""
    if not path.exists():
        return "—"
    times = sorted(
        datetime.fromisoformat(json.loads(line)["labeled_at"].replace("Z", "+00:00")).timestamp()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    )
    return f"{times[-1] - times[-2]:.2f}" if len(times) > 1 else "—"


def seed_counts(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(r["id"] for r in json.loads(path.read_text()) if r.get("label"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="5,000 rows")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--hang-rate", type=float, default=0.001, help="share of requests that never get an answer")
    parser.add_argument("--hang-first", action="store_true", help="the faulty run's first request also hangs")
    parser.add_argument("--hang-late", action="store_true", help="a request near the end of the faulty run hangs")
    parser.add_argument("--seed-design", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    rows = 5000 if args.quick else args.rows
    print(
        f"# soak: {rows} rows, {args.latency_ms:g} ms latency; faults: 1% 500s, "
        f"{args.hang_rate:.1%} hangs, 2% unusable replies"
        + ("; the first request hangs" if args.hang_first else "")
        + ("; a request near the end hangs" if args.hang_late else "")
    )
    print("| design | faults | elapsed s | ÷ fault-free | rows lost | duplicates | retries | last wait s | hedged |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = make_csv(work / "in.csv", rows)
        designs = ["labelstream", *(["seed (gather+semaphore)"] if args.seed_design else [])]
        for design in designs:
            clean_s = None
            for faulty in (False, True):
                sim_args = ["--latency-ms", str(args.latency_ms), *(faults(args.hang_rate) if faulty else ())]
                with simulator(*sim_args) as base_url:
                    if faulty and args.hang_first:
                        hang_next_request(base_url)
                    stop = threading.Event()
                    if faulty and args.hang_late:
                        late = (base_url, rows, stop)
                        threading.Thread(target=hang_late_request, args=late, daemon=True).start()
                    out = work / f"{design[:4]}-{int(faulty)}.jsonl"
                    if design == "labelstream":
                        cmd = labelstream_cmd(source, out, base_url)
                    else:
                        out = out.with_suffix(".json")
                        cmd = [PY, "scripts/seed_baseline.py", str(source), str(out), "--base-url", base_url,
                               "--max_concurrent", "100"]  # fmt: skip
                    measured = run_child(cmd, timeout=max(600.0, rows / 50))
                    stop.set()
                counts = sink_counts(out) if design == "labelstream" else seed_counts(out)
                lost = rows - len(counts)
                duplicates = sum(n - 1 for n in counts.values() if n > 1)
                ratio = "1.00" if clean_s is None else f"{measured.elapsed_s / clean_s:.2f}"
                clean_s = clean_s or measured.elapsed_s
                retries = wait = hedged = "—"
                if design == "labelstream":
                    summary = [line for line in measured.stderr.splitlines() if "retries:" in line]
                    retries = summary[-1].split("retries:")[-1].strip() if summary else "?"
                    wait = last_row_wait(out)
                    copies = [line.split()[0] for line in measured.stderr.splitlines() if " hedged:" in line]
                    hedged = copies[-1] if copies else "0"
                print(
                    f"| {design} | {'yes' if faulty else 'no'} | {measured.elapsed_s:.1f} | {ratio} | {lost} | "
                    f"{duplicates} | {retries} | {wait} | {hedged} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
