"""What `--procs N --max-cost X` spends in total: every shard's own spending, added up, against the cap.

    python scripts/check_procs_budget.py [--rows 4000] [--procs 2] [--max-cost 0.05] [--code DIR]

Replies carry 150 hidden reasoning tokens (billed, unseen by the estimate), so the run passes its estimate and
must stop at the cap. The spend is what each shard's summary says it cost, the worst case of abandoned
attempts included. `--code DIR` runs the labelstream package of another checkout (e.g. an export of an older
commit) against the same simulator, for a before/after figure. Bounded: a row count and a timeout; all traffic
goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from benchlib import PY, ROOT, make_csv, simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--max-cost", type=float, default=0.05)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose `pipeline` package runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, simulator("--reasoning-tokens", "150") as base_url:
        work = Path(tmp)
        source = make_csv(work / "in.csv", args.rows)
        config = work / "sentiment.toml"  # room for the hidden tokens in the worst case of a reply
        text = (ROOT / "configs" / "sentiment.toml").read_text(encoding="utf-8")
        config.write_text(text.replace("max_tokens = 20", "max_tokens = 200"), encoding="utf-8")
        out = work / "out.jsonl"
        cmd = [
            PY, "-m", "pipeline", "label", "--input", str(source), "--output", str(out), "--config", str(config),
            "--base-url", base_url, "--quiet", "--procs", str(args.procs), "--max-cost", f"{args.max_cost}",
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=args.code, capture_output=True, text=True, timeout=600, check=False)
        spent, labeled = 0.0, 0
        for progress in sorted((work / "out.jsonl.meta").glob("shard-*/progress.json")):
            summary = json.loads(progress.read_text())["summary"]
            spent += summary["cost_usd"] or 0.0
            labeled += summary["labeled"]
    if done.returncode not in (0, 1, 4) or not labeled:
        print(done.stderr[-2000:])
    verdict = "within" if spent <= args.max_cost else "OVER"
    cells = [str(args.procs), f"{args.rows:,}", f"${args.max_cost:g}", f"${spent:.4f} ({verdict})", f"{labeled:,}"]
    print(f"| {' | '.join(cells)} | {done.returncode} |")


if __name__ == "__main__":
    main()
