"""`make demo`: start the simulator, label the bundled sample, show the output, re-run to show the resume,
score the labels against the sample's gold column and write the HTML report, stop.

Everything runs on 127.0.0.1; no API key is needed. Output goes to out/ (replaced each time): demo.jsonl, the
review file of its least sure rows, demo_labeled.csv and demo-report.html.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"
SAMPLE = ROOT / "configs" / "sample_reviews.csv"
CONFIG = ROOT / "configs" / "sentiment.toml"


DEMO_SERVER = ("--latency-ms", "150", "--latency-jitter-ms", "100", "--error-rate", "0.02")


def start_simulator(port_file: Path, flags: Sequence[str] = DEMO_SERVER) -> tuple[subprocess.Popen[bytes], int]:
    """Start `labelstream simulate` with `flags` on a free port and wait (at most 20 s) until it listens."""
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", "0", "--port-file", str(port_file), *flags],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise SystemExit("the simulator exited before listening; see the error above")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the simulator did not start within 20 s")


def label(port: int, output: Path) -> int:
    """Run the real CLI against the simulator; return its exit code."""
    env = {**os.environ, "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    cmd = [
        sys.executable, "-m", "pipeline", "label",
        "--input", str(SAMPLE.relative_to(ROOT)), "--output", str(output.relative_to(ROOT)),
        "--config", str(CONFIG.relative_to(ROOT)), "--base-url", f"http://127.0.0.1:{port}/v1",
        "--concurrency", "20", "--review-below", "0.7",
    ]  # fmt: skip
    print("$ labelstream " + " ".join(cmd[3:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def run_cli(*args: str) -> None:
    """Show and run one more labelstream command."""
    print("$ labelstream " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, check=False)


def show(output: Path, n: int = 5) -> None:
    """Print the first records of a JSONL sink."""
    print(f"\nfirst {n} records of {output.relative_to(ROOT)}:")
    with output.open("rb") as handle:
        for line, _ in zip(handle, range(n), strict=False):
            record = orjson.loads(line)
            sure = record.get("confidence")
            shown = f"{sure:.2f}" if isinstance(sure, float) else "–"
            where = f"({record['lang']}, {record['latency_ms']:.0f} ms)"
            print(f"  {record['id']}  {record['label']:<8}  confidence {shown}  {where}")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    output = OUT / "demo.jsonl"
    report = OUT / "demo-report.html"
    for stale in (output, OUT / "demo.jsonl.meta", OUT / "demo_labeled.csv", OUT / "demo.review.csv", report):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    proc, port = start_simulator(OUT / ".demo-sim-port")
    try:
        print(f"simulator listening on http://127.0.0.1:{port}/v1 (150±100 ms latency, 2% server errors)\n")
        code = label(port, output)
        show(output)
        print("\nre-running the same command resumes from the sink: nothing is left to label.\n")
        second = label(port, output)
        print()
        run_cli("status", "out/demo.jsonl")
        labeled = OUT / "demo_labeled.csv"
        run_cli(
            "export", "out/demo.jsonl", "--input", str(SAMPLE.relative_to(ROOT)), "--to", str(labeled.relative_to(ROOT))
        )
        print("  " + "\n  ".join(labeled.read_text(encoding="utf-8").splitlines()[:4]))
        print(f"\nprogress file: {(OUT / 'demo.jsonl.meta' / 'progress.json').relative_to(ROOT)}")
        print("\nhow good are the labels? the sample's gold column holds the right answers:\n")
        sample = str(SAMPLE.relative_to(ROOT))
        run_cli(
            "eval",
            "out/demo.jsonl",
            "--gold",
            sample,
            "--gold-column",
            "gold",
            "--report",
            str(report.relative_to(ROOT)),
        )
        print(f"\nopen the report in a browser: {report}")
        return code or second
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
