"""Auto concurrency against modelled self-hosted servers, in virtual time: deterministic, about a minute.

    python scripts/bench_knee.py [--seeds 5] [--seconds 30]

The discrete-event slot server of `tests/test_knee.py` (at most `slots` requests worked on at once, the rest
queued first come first served, a request `cost` × slower in a full batch) with latencies that stay close together
(±10% jitter; none: lock step, as the simulator's `--slots`) or spread as vLLM's do (±60%, ±80%). For each server
and seed: auto's throughput and p99 as ratios to the best of the fixed concurrencies ½×, 1× and 2× the slots, and
the most requests auto held in flight. Prints one markdown table of the minimum and mean over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.test_knee as model  # the model lives with its tests

SERVERS = [  # (slots, cost, jitter)
    (16, 2.0, 0.6),
    (16, 1.0, 0.6),
    (64, 0.5, 0.6),
    (32, 2.0, 0.8),
    (16, 2.0, 0.1),
    (64, 0.5, 0.1),
    (32, 2.0, 0.0),
    (64, 0.0, 0.0),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"# {args.seeds} seeds, {args.seconds:g} s of virtual time each, after a 5 s warm-up")
    print("| slots | cost | jitter | auto ÷ best fixed: min | mean | p99 ÷ best's: max | most in flight |")
    print("|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    for slots, cost, jitter in SERVERS:
        rates, p99s, peaks = [], [], []
        for seed in range(args.seeds):
            server = {"cost": cost, "jitter": jitter, "seconds": args.seconds, "seed": seed * 1000 + 7}
            best = model.best_fixed(slots=slots, **server)
            auto = model.serve(slots=slots, **server)
            rates.append(auto.rate / best.rate)
            p99s.append(auto.p99 / best.p99)
            peaks.append(auto.max_in_flight)
        ratios += rates
        print(f"| {slots} | {cost:g} | ±{jitter:.0%} | {min(rates):.3f} | {statistics.mean(rates):.3f} | "
              f"{max(p99s):.2f} | {max(peaks)} |")  # fmt: skip
    print(f"\nall servers: mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}")


if __name__ == "__main__":
    main()
