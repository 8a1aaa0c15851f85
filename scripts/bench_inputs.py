"""Input readers: rows/s and peak RSS reading the same rows as CSV, CSV.gz, CSV.zst, JSONL and Parquet.

    python scripts/bench_inputs.py [--rows 200000] [--small 20000] [--label-rows 10000]

Each read runs in its own process (`--read PATH`), which streams every Row of the file through the reader
labelstream runs use (the columns a Row needs, batch by batch) and nothing else, so the figures are the
reader's own. Peak RSS is the child's VmHWM; the small file shows whether it grows with the input.
With --label-rows, each format is also labeled end to end against a zero-latency simulator.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PY, ROOT, labelstream_cmd, make_csv, run_child, sim_reset, simulator


def read_all(path: str) -> None:
    """Child: read every row; print the count, the seconds opening took (imports, header), and the wall and CPU
    seconds reading took (CPU time is what to compare on a shared machine: wall time there measures the load)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.input.sources import input_source  # noqa: PLC0415
    from pipeline.task.config import load_config  # noqa: PLC0415

    config = load_config(ROOT / "configs" / "sentiment.toml")
    started = time.perf_counter()
    rows = 0
    with input_source(path, config) as source:
        opened, cpu = time.perf_counter(), time.process_time()
        for batch in source.batches(512):
            rows += len(batch)
    print(rows, opened - started, time.perf_counter() - opened, time.process_time() - cpu)


def convert(csv_path: Path, work: Path) -> dict[str, Path]:
    """The same rows in every input format (ids stay strings, so every format makes the same ids)."""
    import gzip  # noqa: PLC0415

    import orjson  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.csv as pacsv  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    options = pacsv.ConvertOptions(column_types={"id": pa.string()})
    parse = pacsv.ParseOptions(newlines_in_values=True)
    table = pacsv.read_csv(csv_path, parse_options=parse, convert_options=options)
    data = csv_path.read_bytes()
    paths = {"csv": csv_path, "csv.gz": work / f"{csv_path.stem}.csv.gz", "csv.zst": work / f"{csv_path.stem}.csv.zst"}
    paths["csv.gz"].write_bytes(gzip.compress(data, 6))
    with pa.CompressedOutputStream(str(paths["csv.zst"]), "zstd") as out:
        out.write(data)
    paths["jsonl"] = work / f"{csv_path.stem}.jsonl"
    with paths["jsonl"].open("wb") as handle:
        for batch in table.to_batches(10_000):
            handle.writelines(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in batch.to_pylist())
    paths["parquet"] = work / f"{csv_path.stem}.parquet"
    pq.write_table(table, paths["parquet"], row_group_size=65_536, compression="zstd")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--read", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--label-rows", type=int, default=10_000)
    args = parser.parse_args()
    if args.read:
        read_all(args.read)
        return
    print(
        "| format | rows | file MB | open s | read s (wall) | read s (CPU) | rows per CPU s | ÷ CSV "
        "| peak RSS MB | ÷ small |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = {n: convert(make_csv(work / f"in-{n}.csv", n), work) for n in (args.small, args.rows)}
        small_peak: dict[str, float] = {}
        csv_rate = 0.0
        for paths in sets.values():
            for kind, path in paths.items():
                measured = run_child([PY, "scripts/bench_inputs.py", "--read", str(path)], timeout=600)
                count, opening, seconds, cpu = measured.stdout.split()
                rate = int(count) / float(cpu)
                csv_rate = rate if kind == "csv" else csv_rate
                small_peak.setdefault(kind, measured.peak_rss_mb)
                print(
                    f"| {kind} | {int(count):,} | {path.stat().st_size / 1e6:.1f} | {float(opening):.2f} | "
                    f"{float(seconds):.2f} | {float(cpu):.2f} | {rate:,.0f} | {rate / csv_rate:.2f} | "
                    f"{measured.peak_rss_mb:.1f} | "
                    f"{measured.peak_rss_mb / small_peak[kind]:.2f} |",
                    flush=True,
                )
        if args.label_rows:
            label_each(work, args.label_rows)


def label_each(work: Path, rows: int) -> None:
    """Label the same rows from each format against a zero-latency simulator."""
    paths = convert(make_csv(work / f"label-{rows}.csv", rows), work)
    print(f"\n| format | rows labeled | elapsed s | rows/s | CPU s | peak RSS MB |  (zero latency, {rows:,} rows)")
    print("|---|---|---|---|---|---|")
    with simulator("--latency-ms", "0") as base_url:
        for kind, path in paths.items():
            sim_reset(base_url)
            out = work / f"out-{kind}.jsonl"
            cmd = labelstream_cmd(path, out, base_url, "--concurrency", "50")
            measured = run_child(cmd, timeout=300)
            status = "" if measured.returncode == 0 else f" (exit {measured.returncode}: {measured.stderr[-300:]})"
            print(
                f"| {kind} | {rows:,}{status} | {measured.elapsed_s:.1f} | {rows / measured.elapsed_s:,.0f} | "
                f"{measured.cpu_s:.1f} | {measured.peak_rss_mb:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
