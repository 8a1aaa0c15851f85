"""Dedupe benchmark: short reviews where a share of the rows repeat a few common texts, with and without dedupe.

    python scripts/bench_dedupe.py [--rows 20000] [--repeat-share 0.3] [--latency-ms 50] [--plan-rows 200000]
                                   [--variants] [--procs 3]

Each run labels the same input against a simulator in its own process; the table gives requests (counted at the
simulator), rows/s, requests/s and their ratio to the ideal (concurrency ÷ latency), the
cost the summary prints, and peak RSS. `--plan-rows` also measures what the dedupe plan itself holds (the pass
that finds repeated texts; the only part that grows with the input) on a larger input, in this process.
`--variants` spells each repeat at random with other case or spacing ("great!", " GREAT! ") and adds a run with
`--dedupe normalized`. `--procs N` adds a dedupe run split into N shards side by side (shards by text: each
distinct text is still sent once in total).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import resource
import tempfile
import time
from pathlib import Path

from benchlib import labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator

# Short reviews people write again and again (Korean and English, as in the sample).
COMMON = ["좋아요", "Great!", "별로", "최고예요", "Good", "괜찮아요", "배송 빨라요", "Bad", "만족합니다", "OK"]


def spelled(text: str, rng: random.Random) -> str:
    """`text` as people also type it: other case, or stray spaces."""
    return rng.choice([text, text.lower(), text.upper(), f" {text}", f"{text}  ", text.replace(" ", "  ")])


def with_repeats(source: Path, target: Path, share: float, seed: int = 7, *, variants: bool = False) -> Path:
    """Copy a sample CSV, replacing the text of `share` of its rows by one of the common short reviews (in other
    spellings too, with `variants`); the other rows get their id appended (the sample draws from few phrases, real
    reviews rarely repeat a long text)."""
    rng = random.Random(seed)
    with source.open(newline="", encoding="utf-8") as inp, target.open("w", newline="", encoding="utf-8") as out:
        reader = csv.DictReader(inp)
        writer = csv.DictWriter(out, fieldnames=list(reader.fieldnames or []))
        writer.writeheader()
        for row in reader:
            common = spelled(rng.choice(COMMON), rng) if variants else rng.choice(COMMON)
            row["text"] = common if rng.random() < share else f"{row['text']} ({row['id']})"
            writer.writerow(row)
    return target


def plan_rss(path: Path, matching: str = "exact") -> tuple[float, float, int]:
    """Seconds, RSS growth (MB) and repeated texts of the dedupe plan over `path` (in this process)."""
    from pipeline.input.ids import IdSet  # noqa: PLC0415 - only this measurement loads the package
    from pipeline.run.options import RunOptions  # noqa: PLC0415
    from pipeline.run.prepare import Prepared, open_source  # noqa: PLC0415
    from pipeline.sinks import Manifest, open_sink  # noqa: PLC0415
    from pipeline.task.config import load_config  # noqa: PLC0415

    opts = RunOptions.build(
        path, path.with_suffix(".jsonl"), load_config("configs/sentiment.toml"), dedupe_match=matching
    )
    source = open_source(opts)
    source.open()
    prepared = Prepared(source, open_sink(opts.output), IdSet(), Manifest())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    plan = prepared.plan_dedupe(opts)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    source.close()
    return seconds, grown, len(plan.wanted)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat-share", type=float, default=0.3)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--plan-rows", type=int, default=0, help="also measure the dedupe plan on this many rows")
    parser.add_argument("--variants", action="store_true", help="repeats in other case/spacing; a normalized run")
    parser.add_argument("--procs", type=int, default=0, help="also a dedupe run in this many shards side by side")
    args = parser.parse_args()
    ideal = args.concurrency / (args.latency_ms / 1000)
    print(f"# {args.rows:,} rows, {args.repeat_share:.0%} repeat {len(COMMON)} short texts; "
          f"--concurrency {args.concurrency}, {args.latency_ms} ms latency (ideal {ideal:.0f} requests/s)")  # fmt: skip
    print("| run | requests | rows/s | requests/s | ÷ ideal | cost | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", str(args.latency_ms)) as base_url:
        work = Path(tmp)
        sample = make_csv(work / "sample.csv", args.rows)
        source = with_repeats(sample, work / "in.csv", args.repeat_share, variants=args.variants)
        runs = [("--no-dedupe", ["--no-dedupe"]), ("dedupe (default)", [])]
        runs += [("--dedupe normalized", ["--dedupe", "normalized"])] if args.variants else []
        runs += [(f"dedupe, --procs {args.procs}", ["--procs", str(args.procs)])] if args.procs > 1 else []
        for name, extra in runs:
            sim_reset(base_url)
            out = work / f"out{len(extra)}.jsonl"
            cmd = labelstream_cmd(source, out, base_url, "--concurrency", str(args.concurrency), *extra, dedupe=True)
            measured = run_child(cmd, timeout=args.rows * 0.05 + 120)
            requests = int(str(sim_stats(base_url)["requests"]))
            cost = re.search(r"≈ \$([0-9.]+)", measured.stderr + measured.stdout)
            rate, sent = args.rows / measured.elapsed_s, requests / measured.elapsed_s
            print(f"| {name} | {requests:,} | {rate:.0f} | {sent:.0f} | {sent / ideal:.2f} | "
                  f"${cost.group(1) if cost else '?'} | {measured.peak_rss_mb:.0f} |", flush=True)  # fmt: skip
        if args.plan_rows:
            big = with_repeats(
                make_csv(work / "big.csv", args.plan_rows), work / "big-in.csv", args.repeat_share,
                variants=args.variants,
            )  # fmt: skip
            for matching in ("exact", "normalized") if args.variants else ("exact",):
                seconds, grown, repeated = plan_rss(big, matching)
                print(f"\n{matching} dedupe plan over {args.plan_rows:,} rows: {seconds:.1f} s, "
                      f"RSS +{grown:.1f} MB, {repeated:,} repeated texts remembered")  # fmt: skip


if __name__ == "__main__":
    main()
