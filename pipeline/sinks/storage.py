"""Where an output lives when it is not on a local disk: a prefix in an object store (s3://, gs://).

Data goes through `pyarrow.fs`, which pandas, duckdb and polars users already have; the lease's conditional
writes go through the provider's own client (`conditional.py`), because pyarrow.fs cannot send them, and so do
reads of small side objects on s3:// when boto3 is installed (one GET: see `ObjectStore.get`).

Credentials come from where the provider's own tools look (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, instance
roles, `GOOGLE_APPLICATION_CREDENTIALS`, ...) or from `--storage-option key=value`; they are handed to the
clients and never kept anywhere else, printed or written. `endpoint_override` (or `AWS_ENDPOINT_URL`, or
`STORAGE_EMULATOR_HOST` for gs://) points at an S3-compatible store or a GCS emulator.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path, PosixPath, PurePath
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import StorageError, UsageError
from pipeline.sinks.conditional import CONNECT_TIMEOUT, REQUEST_TIMEOUT, ConditionalWrites, conditional_writes
from pipeline.sinks.storage_options import configured

if TYPE_CHECKING:
    import pyarrow.fs as pafs

SCHEMES: Final = ("s3", "gs")
_filesystems: dict[tuple[str, tuple[tuple[str, str], ...]], pafs.FileSystem] = {}
_s3_clients: dict[tuple[object, ...], Any] = {}


def object_uri(path: str | PurePath) -> str | None:
    """`s3://bucket/key` when `path` names an object, else None.

    A `Path` folds `s3://b/k` to `s3:/b/k`, and outputs travel through the run as Paths, so both spellings
    are recognised here, in one place.
    """
    text = str(path)
    for scheme in SCHEMES:
        for head in (f"{scheme}://", f"{scheme}:/"):
            if text.startswith(head):
                return f"{scheme}://{text[len(head) :]}"
    return None


class ObjectPath(PosixPath):
    """An object location carried where the run carries Paths (`/`, `.name`, `.with_name` keep working); its
    str() is the URI again, so messages, the manifest and the progress file name it as the user wrote it."""

    def __str__(self) -> str:
        text = super().__str__()
        return object_uri(text) or text


def as_path(location: str | PurePath) -> Path:
    """A local Path, or an ObjectPath for an s3:// or gs:// location (also one a Path has folded)."""
    uri = object_uri(location)
    return ObjectPath(uri) if uri is not None else Path(location)


def object_filesystem(location: str | PurePath) -> Any:
    """The pyarrow filesystem for an s3:// or gs:// location, built with `--storage-option` (None when local)."""
    uri = object_uri(location)
    return ObjectStore(uri).fs if uri is not None else None


def uri_options(location: str | PurePath) -> dict[str, str]:
    """The store's endpoint, scheme and region as pyarrow URI parameters (never a credential), so that a reader
    that parses the URI itself looks nowhere else (without a region, pyarrow asks AWS where the bucket is)."""
    uri = object_uri(location)
    if uri is None or not uri.startswith("s3://"):
        return {}
    store = ObjectStore(uri)
    found: dict[str, str] = {}
    if store.endpoint:
        scheme, sep, host = store.endpoint.partition("://")
        found.update(endpoint_override=host if sep else store.endpoint, scheme=scheme if sep else "https")
    region = store.region
    return {**found, "region": region} if region else found


def read_location(path: Path) -> bytes:
    """The bytes of a file or, for an s3:// or gs:// location, of an object (FileNotFoundError if there is none)."""
    uri = object_uri(path)
    if uri is None:
        return path.read_bytes()
    store = ObjectStore(uri)
    return store.get(store.key(uri))


@functools.cache
def _boto3_installed() -> bool:
    return importlib.util.find_spec("boto3") is not None


def _endpoint(options: Mapping[str, str]) -> str | None:
    return (
        options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


class ObjectStore:
    """One bucket of an object store: whole-object puts, reads, listings and deletes, with clear errors.

    Keys are `bucket/path/inside` (pyarrow's spelling). A put is atomic: readers see the old object or the new
    one, never part of it; that is what replaces write-then-rename here.
    """

    def __init__(self, uri: str, options: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self.scheme, _, rest = uri.partition("://")
        self.bucket = rest.split("/", 1)[0]
        if not self.bucket:
            raise UsageError(f"{uri}: name a bucket, as in {self.scheme}://BUCKET/prefix/labels.parquet.")
        self.options: Mapping[str, str] = dict(configured() if options is None else options)
        self._options = self.options
        self.endpoint = _endpoint(self._options) if self.scheme == "s3" else _gcs_endpoint(self._options)
        self._fs: pafs.FileSystem | None = None
        self._s3: Any = None
        self._writes: ConditionalWrites | None = None

    @property
    def where(self) -> str:
        """The store as messages name it: the bucket and the endpoint (never a credential)."""
        return f"bucket {self.bucket!r} at {self.endpoint or 'the default ' + self.scheme + ' endpoint'}"

    def key(self, path: str | PurePath) -> str:
        """The pyarrow key of a location given as a URI or a Path (`s3:/b/k` → `b/k`)."""
        uri = object_uri(path)
        if uri is None:
            raise ValueError(f"not an object location: {path}")
        return uri.partition("://")[2]

    def uri_of(self, key: str) -> str:
        """The URI of a key, for messages."""
        return f"{self.scheme}://{key}"

    @property
    def region(self) -> str | None:
        """The bucket's region, when given (`--storage-option region=`, AWS_REGION, AWS_DEFAULT_REGION)."""
        return self._options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")

    @property
    def lease_seconds(self) -> float:
        """How long a writer's lease lasts unless renewed (`--storage-option lease_seconds=N`)."""
        raw = self._options.get("lease_seconds", "60")
        try:
            seconds = float(raw)
        except ValueError:
            raise UsageError(f"--storage-option lease_seconds={raw}: give a number of seconds.") from None
        return max(seconds, 1.0)  # renewed every third of it: below a second that is a busy loop

    @property
    def anonymous(self) -> bool:
        """gs:// with no credentials: a local emulator (plain http, or STORAGE_EMULATOR_HOST) never asks for any."""
        local = bool(os.environ.get("STORAGE_EMULATOR_HOST")) or (self.endpoint or "").startswith("http://")
        return self.scheme == "gs" and local and not self._options.get("access_token")

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem of this store (made on first use)."""
        if self._fs is None:
            # One filesystem per scheme and options in a process: each costs a client and its connections.
            key = (f"{self.scheme} {self.endpoint}", tuple(sorted(self._options.items())))
            self._fs = _filesystems.get(key) or _filesystems.setdefault(key, self._make_fs())
        return self._fs

    def _make_fs(self) -> pafs.FileSystem:
        import pyarrow.fs as pafs  # noqa: PLC0415 - pyarrow is slow to import; JSONL runs never need it

        opts = self._options
        if self.scheme == "gs":
            return pafs.GcsFileSystem(**self._gcs_fs_options())
        kwargs: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "request_timeout": REQUEST_TIMEOUT,
            "allow_bucket_creation": False,
            "allow_bucket_deletion": False,
            # A small object is then sent as one PutObject at close, not a 3-request multipart upload (whose
            # abandoned halves a kill -9 would leave behind); errors still surface, at close, inside put().
            "allow_delayed_open": True,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        if self.endpoint:
            scheme, sep, host = self.endpoint.partition("://")
            kwargs["endpoint_override"] = host if sep else self.endpoint
            kwargs["scheme"] = scheme if sep else "https"
        if self.region:
            kwargs["region"] = self.region
        if opts.get("access_key"):
            kwargs.update(access_key=opts["access_key"], secret_key=opts.get("secret_key", ""))
            if opts.get("session_token"):
                kwargs["session_token"] = opts["session_token"]
        return pafs.S3FileSystem(**kwargs)

    def _gcs_fs_options(self) -> dict[str, Any]:
        # pyarrow's GCS client overruns its retry limit by about half (a 15 s limit gave up after 22 s against a
        # closed port): 10 s rides out a store's brief unavailability and still names a wrong endpoint in ~11 s.
        kwargs: dict[str, Any] = {"retry_time_limit": timedelta(seconds=CONNECT_TIMEOUT * 2)}
        if self.endpoint:
            scheme, sep, host = self.endpoint.partition("://")
            kwargs.update(endpoint_override=host if sep else self.endpoint, scheme=scheme if sep else "https")
        if token := self._options.get("access_token"):
            # pyarrow wants an expiry with a token; a token outlives no hour, and a run that needs longer
            # should use GOOGLE_APPLICATION_CREDENTIALS, which refresh themselves.
            kwargs.update(access_token=token, credential_token_expiration=datetime.now(UTC) + timedelta(hours=1))
        elif self.anonymous:
            kwargs["anonymous"] = True
        return kwargs

    def writes(self) -> ConditionalWrites:
        """The client of conditional writes (the lease) and deletes for this store (made on first use)."""
        if self._writes is None:
            self._writes = conditional_writes(self)
        return self._writes

    def s3(self) -> Any:
        """A boto3 S3 client, for the lease's conditional writes and whole-object reads (the optional extra `s3`)."""
        if self._s3 is None:
            # One client per endpoint, options and AWS_* environment in a process (like `fs`): making one loads
            # botocore's service model (0.1 s of JSON alone, seconds when several shards start at once), and a
            # run opens a store for every manifest it reads. boto3's clients are safe to share between threads.
            aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
            key = (self.endpoint, tuple(sorted(self._options.items())), aws_env)
            self._s3 = _s3_clients.get(key) or _s3_clients.setdefault(key, self._make_s3())
        return self._s3

    def _make_s3(self) -> Any:
        try:
            import boto3  # noqa: PLC0415 - optional: only writers on s3:// need it
            from botocore.config import Config  # noqa: PLC0415
        except ImportError:
            raise UsageError(
                f"writing {self.uri} needs boto3 for its lease: pip install 'labelstream[s3]' (or pip install "
                "boto3), then re-run."
            ) from None
        opts = self._options
        session = boto3.session.Session(profile_name=opts.get("profile") or None)
        return session.client(
            "s3",
            endpoint_url=self.endpoint or None,
            region_name=self.region or None,  # also AWS_REGION, which botocore itself does not read
            aws_access_key_id=opts.get("access_key") or None,
            aws_secret_access_key=opts.get("secret_key") or None,
            aws_session_token=opts.get("session_token") or None,
            config=Config(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=REQUEST_TIMEOUT,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def s3_errors(self) -> tuple[type[Exception], ...]:
        """What the boto3 client raises when the store refuses or cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 - after s3() checked boto3

        return (BotoCoreError, ClientError)

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Write one whole object (atomic: it appears complete or not at all)."""
        try:
            with self.fs.open_output_stream(key, metadata={}) as handle:
                handle.write(data)
        except OSError as exc:
            raise self.error(f"cannot write {self.uri_of(key)}", exc) from None

    def get(self, key: str) -> bytes:
        """The whole object, all of one version of it; FileNotFoundError when there is none.

        pyarrow reads an S3 object as a HEAD and then a GET of the size the HEAD gave, so a longer version put in
        between comes back cut short (a sibling shard's manifest read while it was rewritten "was damaged"). boto3,
        which every writer has for its lease, reads it in one GET. A reader without boto3 keeps pyarrow's way (and
        that rare race: docs/object-storage.md says to install the s3 extra to read a live run too).
        """
        if self.scheme == "s3" and _boto3_installed():
            whole = self.writes().read(key)
            if whole is None:
                raise FileNotFoundError(key)
            return whole.data
        try:
            with self.fs.open_input_stream(key) as handle:
                return bytes(handle.read())
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "NO_SUCH_KEY" in str(exc) or "Path does not exist" in str(exc):
                raise FileNotFoundError(key) from None
            raise self.error(f"cannot read {self.uri_of(key)}", exc) from None

    def objects(self, prefix: str) -> list[tuple[str, int]]:
        """(name, size) of the objects directly under `prefix/` (nothing when there are none)."""
        return [(name, size) for name, size, is_dir in self.entries(prefix) if not is_dir]

    def entries(self, prefix: str) -> list[tuple[str, int, bool]]:
        """(name, size, is a "folder") of what is directly under `prefix/`: objects and common prefixes."""
        import pyarrow.fs as pafs  # noqa: PLC0415

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True))
        except OSError as exc:
            raise self.error(f"cannot list {self.uri_of(prefix)}", exc) from None
        return [(i.base_name, i.size or 0, i.type == pafs.FileType.Directory) for i in infos]

    def delete(self, key: str) -> None:
        """Delete an object (no error when it is gone already), through a writer's client (`writes`)."""
        self.writes().delete(key)

    def copy(self, source: str, target: str) -> bool:
        """Copy an object inside the store (server-side: the copy appears whole); False when `source` is gone."""
        return self.writes().copy(source, target)

    def error(self, what: str, exc: BaseException) -> StorageError:
        """A StorageError that says what failed on this store and what to do (never a credential)."""
        text = str(exc)
        response = getattr(exc, "response", None)  # a boto3 ClientError: the store's own code and status
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = f"{text} {response.get('Error', {}).get('Code', '')} {status}"
        for kind, markers in _MARKERS.items():
            if _mentions(text, *markers):
                return self.failure(what, kind)
        hint = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''} ({self.where})."
        return StorageError(f"{what}: {hint} Parts written before are complete; re-run to resume.")

    def failure(self, what: str, kind: str) -> StorageError:
        """The StorageError for a failure of a known `kind` (a key of `_MARKERS`), with what to check."""
        endpoint = self.endpoint or f"the default {self.scheme} endpoint"
        gs = self.scheme == "gs"
        keys = (
            "GOOGLE_APPLICATION_CREDENTIALS (or --storage-option access_token)"
            if gs
            else "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, --storage-option access_key/secret_key)"
        )
        hints = {
            "credentials": f"{self.where} does not accept these credentials. Check {keys}.",
            "no_bucket": f"the bucket {self.bucket!r} does not exist at {endpoint}. Create it, or fix --output.",
            "permission": (
                f"no permission on {self.where}. Check the credentials ({keys}) and the bucket policy: a writer "
                "needs to list, get, put and delete objects."
            ),
            "unreachable": (
                f"cannot reach {endpoint}. Check {'STORAGE_EMULATOR_HOST' if gs else 'AWS_ENDPOINT_URL'} or "
                "--storage-option endpoint_override, and the network."
            ),
        }
        return StorageError(f"{what}: {hints[kind]} Parts written before are complete; re-run to resume.")


# What the stores' messages (boto3's codes, pyarrow's statuses) say for each kind of failure `failure` explains.
_MARKERS: Final = {
    "credentials": ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SignatureDoesNotMatch"),
    "no_bucket": ("NO_SUCH_BUCKET", "NoSuchBucket"),
    "permission": ("ACCESS_DENIED", "AccessDenied", " 403", "PERMISSION_DENIED"),
    "unreachable": ("NETWORK_CONNECTION", "Could not connect", "connect timeout", "Connect timeout"),
}


def _mentions(text: str, *markers: str) -> bool:
    return any(marker in text for marker in markers)


def _gcs_endpoint(options: Mapping[str, str]) -> str | None:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and "://" not in emulator:
        emulator = f"http://{emulator}"
    return options.get("endpoint_override") or emulator
