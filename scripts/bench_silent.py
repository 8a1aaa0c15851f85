"""A silent provider (no rate headers, no retry-after) at high rates and long latencies, in virtual time.

Runs the real `Limiter` against the simulator's windows through `tests/virtual_provider.py` (no HTTP, nothing
sleeps; deterministic), auto concurrency, no flags, and prints goodput (admitted ÷ the limit over the whole run,
ramp included), the 429 share and when the first 429 came. Usage:

    python scripts/bench_silent.py [--minutes 5] [--long] [--case 12000:3:1 ...]

`--long`: long windows at long latencies instead (600 RPM, 10 s and 60 s windows, replies of 5-20 s).

A case is RPM:latency seconds:window seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.virtual_provider import run_against

CASES = ("600:0.2:1", "3000:1:1", "3000:1.5:1", "12000:3:1", "12000:3:10", "12000:3:60", "1200:30:1", "1200:0.2:60")
LONG = ("600:5:60", "600:7:60", "600:9:60", "600:12:60", "600:7:10", "600:14:10", "600:17:10", "600:20:10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="rows = this many minutes of the limit")
    parser.add_argument("--case", action="append", help="RPM:latency:window (repeatable); default: a spread")
    parser.add_argument("--long", action="store_true", help="long windows at long latencies (see above)")
    args = parser.parse_args()
    print("| RPM | latency s | window s | rows | goodput | 429 share | first 429 s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.case or (LONG if args.long else CASES):
        rpm_text, latency_text, window_text = case.split(":")
        rpm, latency, window = int(rpm_text), float(latency_text), float(window_text)
        rows = round(rpm * args.minutes)
        began = time.monotonic()
        outcome = run_against(rpm, window_seconds=window, quantum=0, rows=rows, latency=latency)
        first = f"{min(outcome.refused):.0f}" if outcome.refused else "-"
        print(
            f"| {rpm} | {latency:g} | {window:g} | {rows} | {outcome.goodput:.3f} | {outcome.refused_share:.2%}"
            f" | {first} | {time.monotonic() - began:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
