"""Conditional writes on an object store: what the lease needs and `pyarrow.fs` cannot send.

    create(key)          only if no object is there       S3 `If-None-Match: *`   GCS `ifGenerationMatch=0`
    replace(key, token)  only if it is still that version  S3 `If-Match: <etag>`   GCS `ifGenerationMatch=<gen>`
    delete(key, token)   only if it is still that version  (the same conditions)
    read(key)            the object, its version and the store's own clock (the `Date` of its reply)

Of two writers that race on one condition, the store lets exactly one through; the other gets 412 and sees
None here. S3 goes through boto3 (the `s3` extra), Google Cloud Storage through google-cloud-storage (the
`gcs` extra); both honour the provider's usual credentials and an endpoint override for a local emulator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

from pipeline.errors import StorageError, UsageError

CONNECT_TIMEOUT: Final = 5.0  # seconds: a wrong endpoint fails within seconds, not after minutes of retries
REQUEST_TIMEOUT: Final = 60.0
_MISSING: Final = frozenset({"NoSuchKey", "404"})


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a read shows it; `etag` is its version token, `now` the store's clock when it answered."""

    data: bytes
    etag: str
    modified: datetime
    now: datetime


class Store(Protocol):
    """What the clients here need of `storage.ObjectStore` (which builds them)."""

    scheme: str
    bucket: str
    uri: str
    endpoint: str | None
    options: Mapping[str, str]

    @property
    def anonymous(self) -> bool: ...
    def uri_of(self, key: str) -> str: ...
    def s3(self) -> Any: ...
    def s3_errors(self) -> tuple[type[Exception], ...]: ...
    def error(self, what: str, exc: BaseException) -> StorageError: ...
    def failure(self, what: str, kind: str) -> StorageError: ...


class ConditionalWrites(Protocol):
    """Whole-object writes that succeed only under a condition on the object's current version."""

    def create(self, key: str, body: bytes) -> str | None:
        """Write `key` only if it does not exist; its version token, or None when it does."""

    def replace(self, key: str, body: bytes, token: str) -> str | None:
        """Rewrite `key` only if it is still version `token`; the new token, or None when it is not."""

    def read(self, key: str) -> ObjectInfo | None:
        """The object with its version token and the store's clock, or None when there is none."""

    def delete(self, key: str, token: str | None = None) -> None:
        """Delete `key` (only if it is still version `token`, when given); no error when it is gone or changed."""

    def copy(self, source: str, target: str) -> bool:
        """Copy an object inside the store (server-side: whole or absent); False when `source` is gone."""


def conditional_writes(store: Store) -> ConditionalWrites:
    """The conditional-write client for the store's scheme."""
    return GcsWrites(store) if store.scheme == "gs" else S3Writes(store)


class S3Writes:
    """Conditional writes through boto3 (`If-None-Match` / `If-Match`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._s3 = store.s3()
        self._errors = store.s3_errors()

    def create(self, key: str, body: bytes) -> str | None:
        return self._put(key, body, IfNoneMatch="*")

    def replace(self, key: str, body: bytes, token: str) -> str | None:
        return self._put(key, body, IfMatch=token)

    def _put(self, key: str, body: bytes, **condition: str) -> str | None:
        bucket, _, name = key.partition("/")
        try:
            reply = self._s3.put_object(Bucket=bucket, Key=name, Body=body, ContentType="application/json", **condition)
        except self._errors as exc:
            if is_precondition_failure(exc):
                return None
            raise self.store.error(f"cannot write {self.store.uri_of(key)}", exc) from None
        return str(reply["ETag"])

    def read(self, key: str) -> ObjectInfo | None:
        bucket, _, name = key.partition("/")
        try:
            reply = self._s3.get_object(Bucket=bucket, Key=name)
            data = reply["Body"].read()  # a connection lost mid-body raises here (botocore's streaming errors)
        except self._errors as exc:
            if _code(exc) in _MISSING:
                return None
            raise self.store.error(f"cannot read {self.store.uri_of(key)}", exc) from None
        headers = reply["ResponseMetadata"]["HTTPHeaders"]
        modified = reply["LastModified"]
        now = parsedate_to_datetime(headers["date"]) if "date" in headers else modified
        return ObjectInfo(data, str(reply["ETag"]), modified, now)

    def delete(self, key: str, token: str | None = None) -> None:
        # boto3, not pyarrow.fs: pyarrow's delete leaves an empty "folder" marker object behind.
        bucket, _, name = key.partition("/")
        try:
            self._s3.delete_object(Bucket=bucket, Key=name, **({"IfMatch": token} if token else {}))
        except self._errors as exc:
            if not is_precondition_failure(exc):
                raise self.store.error(f"cannot delete {self.store.uri_of(key)}", exc) from None

    def copy(self, source: str, target: str) -> bool:
        bucket, _, name = target.partition("/")
        try:
            self._s3.copy_object(Bucket=bucket, Key=name, CopySource=source)
        except self._errors as exc:
            if _code(exc) in _MISSING:
                return False
            raise self.store.error(f"cannot copy {self.store.uri_of(source)}", exc) from None
        return True


def _code(exc: BaseException) -> Any:
    return getattr(exc, "response", {}).get("Error", {}).get("Code")


def is_precondition_failure(exc: BaseException) -> bool:
    """Whether a boto3 error is the store refusing a conditional write (412, or 409 on a concurrent one)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status in {409, 412} or code in {"PreconditionFailed", "ConditionalRequestConflict"}


class GcsWrites:
    """Conditional writes through google-cloud-storage (`ifGenerationMatch`); a version token is a generation."""

    def __init__(self, store: Store) -> None:
        try:
            from google.api_core import exceptions  # noqa: PLC0415 - optional: only writers on gs:// need it
            from google.cloud import storage  # noqa: PLC0415
        except ImportError:
            raise UsageError(
                f"writing {store.uri} needs google-cloud-storage for its lease: pip install 'labelstream[gcs]' "
                "(or pip install google-cloud-storage), then re-run."
            ) from None
        self.store = store
        self._exceptions = exceptions
        self._date: str | None = None
        try:
            self._client = storage.Client(project=None, **_gcs_client_options(store))
        except Exception as exc:  # noqa: BLE001 - google.auth raises several kinds for "no credentials"
            raise self._error("cannot open Google Cloud Storage", exc) from None
        # The store's clock judges a lease's expiry: remember the Date of each reply (requests' response hook on
        # the client's own session; the library returns no headers).
        self._client._http.hooks["response"].append(self._note_date)
        self._bucket = self._client.bucket(store.bucket)
        self._timeout = (CONNECT_TIMEOUT, REQUEST_TIMEOUT)
        from google.cloud.storage.retry import DEFAULT_RETRY  # noqa: PLC0415

        # Bounded, so a wrong endpoint fails within seconds; a conditional write is safe to repeat (412 at worst).
        self._retry = DEFAULT_RETRY.with_timeout(CONNECT_TIMEOUT * 2)

    def _note_date(self, response: Any, *_: Any, **__: Any) -> Any:
        self._date = response.headers.get("Date") or self._date
        return response

    def _blob(self, key: str) -> Any:
        return self._bucket.blob(key.partition("/")[2])

    def create(self, key: str, body: bytes) -> str | None:
        return self._put(key, body, 0)

    def replace(self, key: str, body: bytes, token: str) -> str | None:
        return self._put(key, body, int(token))

    def _put(self, key: str, body: bytes, generation: int) -> str | None:
        blob = self._blob(key)
        try:
            blob.upload_from_string(
                body,
                content_type="application/json",
                if_generation_match=generation,
                timeout=self._timeout,
                retry=self._retry,
            )
        except self._exceptions.PreconditionFailed:
            return None
        except Exception as exc:  # noqa: BLE001 - google-api-core, google-auth and requests errors alike
            raise self._error(f"cannot write {self.store.uri_of(key)}", exc, writing=True) from None
        return str(blob.generation)

    def read(self, key: str) -> ObjectInfo | None:
        name = key.partition("/")[2]
        try:
            blob = self._bucket.get_blob(name, timeout=self._timeout, retry=self._retry)
            now = self._date
            if blob is None:
                return None
            data = blob.download_as_bytes(if_generation_match=blob.generation, timeout=self._timeout, retry=self._retry)
        except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
            return None  # deleted or replaced between the two requests: as if read a moment later
        except Exception as exc:  # noqa: BLE001 - see _put
            raise self._error(f"cannot read {self.store.uri_of(key)}", exc) from None
        modified: datetime = blob.updated
        return ObjectInfo(data, str(blob.generation), modified, parsedate_to_datetime(now) if now else modified)

    def delete(self, key: str, token: str | None = None) -> None:
        try:
            self._blob(key).delete(
                if_generation_match=int(token) if token else None, timeout=self._timeout, retry=self._retry
            )
        except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
            return
        except Exception as exc:  # noqa: BLE001 - see _put
            raise self._error(f"cannot delete {self.store.uri_of(key)}", exc) from None

    def copy(self, source: str, target: str) -> bool:
        try:
            self._bucket.copy_blob(
                self._blob(source), self._bucket, target.partition("/")[2], timeout=self._timeout, retry=self._retry
            )
        except self._exceptions.NotFound:
            return False
        except Exception as exc:  # noqa: BLE001 - see _put
            raise self._error(f"cannot copy {self.store.uri_of(source)}", exc) from None
        return True

    def _error(self, what: str, exc: BaseException, *, writing: bool = False) -> StorageError:
        """The store's error, classified by the exception's kind (google's messages carry no stable codes)."""
        kinds = self._exceptions
        if isinstance(exc, kinds.NotFound) and writing:
            return self.store.failure(what, "no_bucket")
        if isinstance(exc, kinds.Unauthorized) or type(exc).__name__ in {"DefaultCredentialsError", "RefreshError"}:
            return self.store.failure(what, "credentials")
        if isinstance(exc, kinds.Forbidden):
            return self.store.failure(what, "permission")
        if isinstance(exc, (ConnectionError, kinds.RetryError)) or "Connection" in type(exc).__name__:
            return self.store.failure(what, "unreachable")
        return self.store.error(what, exc)


def _gcs_client_options(store: Store) -> dict[str, Any]:
    """Endpoint and credentials for google-cloud-storage, the same ones `ObjectStore.fs` gives pyarrow."""
    found: dict[str, Any] = {}
    token = store.options.get("access_token")
    if token:
        from google.oauth2.credentials import Credentials  # noqa: PLC0415

        found["credentials"] = Credentials(token)  # type: ignore[no-untyped-call] # google-auth is untyped here
    elif store.anonymous:
        from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415

        found["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call] # google-auth is untyped here
    if store.endpoint and not os.environ.get("STORAGE_EMULATOR_HOST"):
        found["client_options"] = {"api_endpoint": store.endpoint}
    return found
