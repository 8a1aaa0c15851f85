"""Object-storage benchmark: the same run into a local Parquet dataset and into s3:// on a loopback S3 server.

    python scripts/bench_storage.py [--quick] [--rows 10000] [--repeats 2] [--latency-ms 20] [--engine online]

The S3 server is moto's (`moto[server]`, in the dev extra), in this script's process; the run under test is a
child. Runs alternate local, s3, local, s3, ... so that drifting machine load hits both alike; the figure is
the ratio of the median elapsed times (the target: s3 within 1.2x of local). The moto CPU column is what the
S3 server itself burnt on the same cores (a real store's CPU is not on the client's machine). Bounded: a row
count and a timeout per run; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from benchlib import labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator
from moto.server import ThreadedMotoServer

# Batches finish in the simulator's 2 s; Ray starts a local instance of its own in each run (part of its time).
ENGINE_ARGS = {"online": (), "batch": ("--engine", "batch", "--poll-interval", "0.2"), "ray": ("--engine", "ray")}
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}  # moto accepts any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2,000 rows once each: a smoke run of the script")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--engine", choices=sorted(ENGINE_ARGS), default="online", help="the same engine both ways")
    args = parser.parse_args()
    rows, repeats = (2000, 1) if args.quick else (args.rows, args.repeats)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**os.environ, **FAKE_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    s3.create_bucket(Bucket="bench")
    print(
        f"# local vs s3:// (moto on loopback): {rows} rows, {args.latency_ms} ms latency, c={args.concurrency}, "
        f"--engine {args.engine}"
    )
    print("| sink | run | elapsed s | rows/s | client CPU s | moto CPU s | parts | exit |")
    print("|---|---|---|---|---|---|---|---|")
    elapsed: dict[str, list[float]] = {"local": [], "s3": []}
    try:
        with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", str(args.latency_ms)) as base_url:
            work = Path(tmp)
            source = make_csv(work / "in.csv", rows)
            for run in range(repeats):
                for kind in ("local", "s3"):
                    name = f"out-{uuid.uuid4().hex[:8]}.parquet"
                    out = str(work / name) if kind == "local" else f"s3://bench/{name}"
                    sim_reset(base_url)
                    extra = ("--concurrency", str(args.concurrency), *ENGINE_ARGS[args.engine])
                    cmd = labelstream_cmd(source, Path(out), base_url, *extra)
                    cmd[cmd.index("--output") + 1] = out  # a Path would fold s3:// to s3:/
                    moto_cpu = time.process_time()  # moto serves from this process: its CPU shares the machine
                    measured = run_child(cmd, timeout=rows / 20 + 120, env=env)
                    moto_cpu = time.process_time() - moto_cpu
                    served = int(sim_stats(base_url)["completed_ok"])  # type: ignore[call-overload]
                    served = served if args.engine != "batch" else rows  # batch requests are not chat calls
                    parts = _parts(s3, name) if kind == "s3" else len(list((work / name).glob("*.parquet")))
                    elapsed[kind].append(measured.elapsed_s)
                    print(
                        f"| {kind} | {run + 1} | {measured.elapsed_s:.1f} | {served / measured.elapsed_s:.0f} | "
                        f"{measured.cpu_s:.1f} | {moto_cpu:.1f} | {parts} | {measured.returncode} |",
                        flush=True,
                    )
                    if measured.returncode != 0:
                        print(f"<!-- {kind}: {measured.stderr[-800:]} -->")
    finally:
        server.stop()
    ratio = statistics.median(elapsed["s3"]) / statistics.median(elapsed["local"])
    print(f"\ns3 / local elapsed (medians): {ratio:.2f}x")
    figures = {"rows": rows, "repeats": repeats, "latency_ms": args.latency_ms, "engine": args.engine}
    print(json.dumps({**figures, "ratio": round(ratio, 3)}))


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def _parts(s3: object, name: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=f"{name}/")  # type: ignore[attr-defined]
    return sum(1 for page in pages for item in page.get("Contents", []) if item["Key"].endswith(".parquet"))


if __name__ == "__main__":
    main()
