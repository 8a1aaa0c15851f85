"""`make compare-demo`: three models on the bundled gold sample, with a simulated quality each, compared.

The simulator plays models of different quality (`--model-quality`, a simulation: each model agrees with the
simulator's text-similarity judge on that share of rows), so the table shows a real trade-off between macro-F1
and price. Everything runs on 127.0.0.1 with no API key; output goes to out/compare/ (replaced each time). The
comparison runs twice: the second run resumes every finished sink and sends nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from demo import start_simulator  # scripts/ is on the path when a script runs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "compare"
GOLD = ROOT / "configs" / "sample_reviews.csv"
CONFIG = ROOT / "configs" / "sentiment.toml"
QUALITY = "gpt-4o-mini=0.8,gpt-4.1-mini=0.97,gpt-4.1=0.98"  # a simulation, not a measurement of these models


def compare(port: int) -> int:
    """Run `labelstream compare` against the simulator; its exit code."""
    words = ["compare", "--input", str(GOLD), "--gold-column", "gold", "--config", str(CONFIG)]
    for model in ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1"):
        words += ["--model", model]
    words += ["--sample", "200", "--out", str(OUT), "--base-url", f"http://127.0.0.1:{port}/v1"]
    return subprocess.run([sys.executable, "-m", "pipeline", *words], check=False, cwd=ROOT).returncode


def main() -> int:
    """Compare, then compare again (a resume: nothing sent), then stop the simulator."""
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    flags = ["--latency-ms", "120", "--latency-jitter-ms", "80", "--model-quality", QUALITY]
    proc, port = start_simulator(OUT.parent / ".compare-demo-port", flags)
    try:
        print(f"$ labelstream compare … (simulated qualities: {QUALITY})\n", flush=True)
        started = time.monotonic()
        code = compare(port)
        print(f"\n(first run: {time.monotonic() - started:.1f} s)\n\n$ the same command again: every sink is done\n")
        code = code or compare(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"\nopen {OUT / 'report.html'} in a browser for the report.")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
