"""Failures read for what they are (issue 19 items 2, 4, 5, 9): what a hopeless run costs before it stops.

    python scripts/bench_failures.py                       # this checkout
    python scripts/bench_failures.py --old-root DIR        # and the same runs with the code in DIR beside it

Scenarios (simulator on 127.0.0.1, bounded in rows and time):
- padded: every reply is whitespace until max_tokens (vLLM's default structured output with a weak model);
  measured: requests sent, wall time, exit code, dead letters, and the tokens the summary shows against
  the tokens the simulator processed.
- closed port: --base-url to a port nothing listens on; wall time, exit code, dead letters.
- gateway holding: a LiteLLM-shaped gateway holding over-limit requests past --timeout; the summary's
  retries split and what it says about the abandoned attempts.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import PY, ROOT, labelstream_cmd, make_csv, sim_reset, sim_stats, simulator


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(root: Path, cmd: list[str], timeout: float) -> tuple[float, int, str]:
    """Run the CLI from the checkout `root`: wall seconds, exit code, stderr."""
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = -9, "timed out"
    return time.perf_counter() - started, code, err


def summary_of(out: Path) -> dict[str, object]:
    progress = out.with_name(out.name + ".meta") / "progress.json"
    doc = json.loads(progress.read_text()) if progress.exists() else {}
    return dict(doc.get("summary") or {})


def dead_letters(out: Path) -> int:
    path = out.with_name(out.name + ".meta") / "dead_letters.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--old-root", type=Path, help="a checkout of the code before the change, run beside")
    parser.add_argument("--only", choices=("padded", "closed", "gateway"), help="run one scenario")
    args = parser.parse_args()
    roots = [("this change", ROOT), *([("before", args.old_root)] if args.old_root else [])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = make_csv(work / "in.csv", args.rows)
        if args.only in (None, "padded"):
            padded(roots, work, source, args.rows)
        if args.only in (None, "closed"):
            closed(roots, work, source, args.rows)
        if args.only in (None, "gateway"):
            held(roots, work, source)
    print(f"\n(python: {PY})")


def padded(roots: list[tuple[str, Path]], work: Path, source: Path, rows: int) -> None:
    """Every reply whitespace until max_tokens: requests, time, tokens shown against tokens processed."""
    print(f"## padded replies: {rows} rows, every reply whitespace until max_tokens, 100 ms latency")
    print("| code | exit | wall s | requests | dead letters | tokens shown | tokens processed |")
    print("|---|---|---|---|---|---|---|")
    with simulator("--latency-ms", "100", "--length-rate", "1") as url:
        for name, root in roots:
            sim_reset(url)
            out = work / f"pad-{len(name)}.jsonl"
            wall, code, _ = run(root, labelstream_cmd(source, out, url), 300)
            stats, summary = sim_stats(url), summary_of(out)
            shown = int(str(summary.get("prompt_tokens", 0))) + int(str(summary.get("completion_tokens", 0)))
            served = int(str(stats["prompt_tokens"])) + int(str(stats["completion_tokens"]))
            print(f"| {name} | {code} | {wall:.1f} | {stats['requests']:,} | {dead_letters(out)} | {shown:,} | "
                  f"{served:,} |")  # fmt: skip


def closed(roots: list[tuple[str, Path]], work: Path, source: Path, rows: int) -> None:
    """--base-url to a closed port: time to the stop, exit code, dead letters."""
    print(f"\n## closed port: {rows} rows, --base-url to a port nothing listens on")
    print("| code | exit | wall s | dead letters | last stderr line |")
    print("|---|---|---|---|---|")
    url = f"http://127.0.0.1:{closed_port()}/v1"
    for name, root in roots:
        out = work / f"closed-{len(name)}.jsonl"
        wall, code, err = run(root, labelstream_cmd(source, out, url), 300)
        last = (err.strip().splitlines() or [""])[-1][:140]
        print(f"| {name} | {code} | {wall:.1f} | {dead_letters(out)} | {last} |")


def held(roots: list[tuple[str, Path]], work: Path, source: Path) -> None:
    """A gateway holding over-limit requests past --timeout: how the summary reads the timeouts."""
    print("\n## gateway holding: LiteLLM-shaped, holds over-limit requests 30 s, 600 RPM over 6 s, --timeout 1.5")
    print("| code | exit | wall s | summary retries line | abandoned / advice |")
    print("|---|---|---|---|---|")
    gateway = ("--gateway", "litellm", "--hold-seconds", "30", "--rpm", "600", "--window-seconds", "6")
    with simulator(*gateway, "--latency-ms", "20") as url:
        for name, root in roots:
            sim_reset(url)
            out = work / f"held-{len(name)}.jsonl"
            cmd = labelstream_cmd(source, out, url, "--timeout", "1.5", "--concurrency", "40")
            wall, code, err = run(root, cmd, 300)
            lines = err.splitlines()
            retries = next((ln.split("; ", 1)[-1] for ln in lines if "retries:" in ln), "")
            said = [ln.strip()[:90] for ln in lines if "abandoned" in ln or "num_retries" in ln]
            print(f"| {name} | {code} | {wall:.1f} | {retries} | {' / '.join(said) or '-'} |")


if __name__ == "__main__":
    main()
