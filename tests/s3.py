"""An S3-compatible server for tests: moto's, on loopback, started by the tests themselves; a bucket per test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from .helpers import wait_for

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

# Recognisable fake credentials: the secrets test looks for them in every file a run leaves.
ACCESS_KEY = "AKIATESTSTORAGEKEY01"
SECRET_KEY = "storage-secret-4f1c9a7e2b"  # noqa: S105 - a fake for moto, looked for in every file


class Bucket:
    """A fresh bucket on the session's moto server, and the environment a CLI run needs to reach it."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=name)

    def uri(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def options(self) -> dict[str, str]:
        """Storage options that reach this bucket from this process (for an ObjectStore in a test)."""
        return {"endpoint_override": self.endpoint, "region": "us-east-1", "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY}  # fmt: skip

    def env_at(self, endpoint: str) -> dict[str, str]:
        """The run's environment with the store's endpoint moved to `endpoint`."""
        return {**self.env, "AWS_ENDPOINT_URL": endpoint}

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    @property
    def fs(self) -> pafs.S3FileSystem:
        """The bucket's store as pyarrow (and pandas through it) reads it."""
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint.removeprefix("http://"), scheme="http", access_key=ACCESS_KEY,
            secret_key=SECRET_KEY, region="us-east-1",
        )  # fmt: skip

    def ids(self, key: str) -> list[str]:
        """The ids a reader sees in the dataset right now (through pyarrow.dataset on the bucket)."""
        return dataset_ids(self, key)


def dataset_ids(bucket: Any, key: str) -> list[str]:
    """The ids a reader sees right now in the dataset `key` of a test bucket (of either store) via pyarrow.dataset."""
    if not any(k.endswith(".parquet") for k in bucket.keys(key + "/")):
        return []
    data = ds.dataset(f"{bucket.name}/{key}", format="parquet", filesystem=bucket.fs)
    return list(data.to_table(columns=["id"]).column("id").to_pylist())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port for the whole session."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(request: pytest.FixtureRequest, s3_server: str) -> Any:
    """A new, empty bucket for one test: on moto's S3 server, or on the GCS emulator for a test that `both_stores`
    runs with "gs" (then the test module imports the gcs fixtures too)."""
    if getattr(request, "param", "s3") == "gs":
        return request.getfixturevalue("gcs_bucket")
    return Bucket(s3_server, f"test-{uuid.uuid4().hex[:12]}")


# A test that holds for both stores: `bucket` is then an S3 bucket or a GCS one (same methods).
both_stores = pytest.mark.parametrize("bucket", ["s3", "gs"], indirect=True)


READ_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
}


@pytest.fixture
def strict_s3(tmp_path: Path) -> Iterator[tuple[Bucket, dict[str, str]]]:
    """A moto server that checks credentials (its own process), a bucket, and the keys of a read-only user."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The first 4 requests (bucket, user, key, policy) go unchecked; every later one needs valid credentials.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: _listening(port), timeout=30, what="moto server")
        bucket = Bucket(endpoint, "strict-bucket")
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                           aws_secret_access_key=SECRET_KEY)  # fmt: skip
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(READ_ONLY))
        yield bucket, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        server.kill()
        server.wait(timeout=30)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
