"""Check that `make label ... ARGS='--engine batch'` labels a file exactly once across kill -9s.

Starts `labelstream simulate` (loopback), makes an input of --rows rows, then runs
`make label INPUT=... OUTPUT=... ARGS='--engine batch --base-url ... --batch-size ...'` and kills the whole
process group with SIGKILL at random moments --kills times, and finally lets one run finish. It then checks:
every id of the input is in the sink exactly once (except rows the input makes unusable, which are
dead-lettered), and the simulator saw every custom_id in exactly one accepted batch.

    python scripts/check_batch_crash.py [--rows 10000] [--kills 8] [--batch-size 1000] [--sink jsonl|parquet]

Bounded: loopback only, every child run has a timeout. The whole check takes about a minute at 10,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from benchlib import ROOT, make_csv, simulator


def control(base_url: str, path: str) -> dict[str, object]:
    """GET a simulator control route."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + path, timeout=30) as reply:  # noqa: S310
        return json.loads(reply.read())  # type: ignore[no-any-return]


def make_label(source: Path, output: Path, base_url: str, batch_size: int) -> list[str]:
    """The `make label` command line of the check."""
    args = f"--engine batch --base-url {base_url} --batch-size {batch_size} --poll-interval 0.2 --no-progress"
    return ["make", "-s", "label", f"INPUT={source}", f"OUTPUT={output}", f"ARGS={args}"]


def sink_ids(output: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from pipeline.sinks import open_sink  # noqa: PLC0415 - the repository's own reader

    return [r["id"] for r in open_sink(output).iter_records(columns=["id"])] if output.exists() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sink", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", "0", "--batch-seconds", "6") as base_url:
        # Each step takes a moment, so kills land in uploads, creates, polls and downloads alike.
        holds = {"upload_reply_seconds": 0.3, "create_reply_seconds": 0.3, "content_reply_seconds": 0.3}
        request = urllib.request.Request(  # noqa: S310 - loopback only
            base_url.removesuffix("/v1") + "/control/config", data=json.dumps(holds).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310
            pass
        source = make_csv(Path(tmp) / "in.csv", args.rows)
        output = Path(tmp) / f"out.{args.sink}"
        env = {**os.environ, "OPENAI_API_KEY": "sk-local-check"}
        kills, started = 0, time.monotonic()
        while kills < args.kills:
            proc = subprocess.Popen(
                make_label(source, output, base_url, args.batch_size),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # make and labelstream in one group: the kill takes both
            )
            time.sleep(rng.uniform(1.0, 5.0))
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            ids = sink_ids(output)
            counts = Counter(control(base_url, "/control/batches")["submissions"])  # type: ignore[arg-type]
            most = max(counts.values(), default=0)
            print(f"kill {kills}: {len(ids):,} rows in the sink ({len(set(ids)):,} distinct); a row went out ≤ {most}×")
        final = subprocess.run(
            make_label(source, output, base_url, args.batch_size),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        print("\n".join(final.stderr.strip().splitlines()[-6:]))
        ids = sink_ids(output)
        submitted = Counter(control(base_url, "/control/batches")["submissions"])  # type: ignore[arg-type]
        # The run's own gate says what is left: nothing, once every usable row is in the sink.
        plan = subprocess.run(
            [sys.executable, "-m", "pipeline", "label", "--input", str(source), "--output", str(output),
             "--base-url", base_url, "--dry-run"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        left = next((line.strip() for line in plan.stdout.splitlines() if "rows to label" in line), plan.stderr)
        ok = len(ids) == len(set(ids)) and left.startswith("0 rows to label") and set(submitted.values()) == {1}
        print(
            f"{args.rows:,} input rows, {kills} kills, {time.monotonic() - started:.0f} s: "
            f"final exit {final.returncode}; sink {len(ids):,} rows ({len(set(ids)):,} distinct); custom_ids "
            f"submitted {len(submitted):,}, each at most {max(submitted.values(), default=0)}×; dry run: {left}"
        )
        print("EXACTLY ONCE: yes" if ok else "EXACTLY ONCE: NO")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
