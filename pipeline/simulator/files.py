"""The simulator's Files API: upload (multipart), retrieve, content and delete, kept in memory.

Batch input files arrive here; batch output and error files are added by `batches.py`.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from pipeline.simulator.faults import error_body, pause

UPLOAD_PURPOSES: Final = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
MAX_FILE_BYTES: Final = 512 * 1024 * 1024
MAX_BATCH_FILE_BYTES: Final = 200 * 1024 * 1024  # the Batch API's limit on an input file
Handler = Callable[[web.Request], Awaitable[web.Response]]
_BOUNDARY: Final = re.compile(r"boundary=(\"[^\"]+\"|[^;\s]+)")
_PARAM_NAME: Final = re.compile(r'(?:^|;)\s*name="([^"]*)"')
_PARAM_FILENAME: Final = re.compile(r'filename="([^"]*)"')


class Front(Protocol):
    """What the Files and Batch routes need of the server: request ids, the key check, its settings."""

    def admit(self, request: web.Request) -> tuple[dict[str, str], web.Response | None]:
        """Headers for the reply (its request id), and the 401 to send instead if the key is wrong."""
        ...

    def reply_hold(self, name: str) -> float:
        """Seconds to hold the reply of `name` ("upload", "create", "content") after doing the work."""
        ...

    @property
    def stopping(self) -> Any:
        """Set when the server stops (an asyncio.Event)."""
        ...


@dataclass(slots=True)
class StoredFile:
    """One file: its bytes and what the API says about it."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The `file` object (fields the API leaves out are left out, never null)."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        return out


class FileStore:
    """Files by id, in memory."""

    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self.downloads = 0  # content requests received (crash tests wait for one to begin)

    def __len__(self) -> int:
        return len(self._files)

    def add(self, filename: str, purpose: str, data: bytes, *, expires_after: int | None = None) -> StoredFile:
        """Store `data` under a new id."""
        now = int(time.time())
        stored = StoredFile(
            id=f"file-{self._prefix}{next(self._ids):018x}",
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=now,
            expires_at=now + expires_after if expires_after is not None else None,
        )
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        """The file with this id, if there is one."""
        return self._files.get(file_id)

    def delete(self, file_id: str) -> bool:
        """Forget a file; False if there was none."""
        return self._files.pop(file_id, None) is not None

    def clear(self) -> None:
        """Forget every file."""
        self._files.clear()
        self.downloads = 0


def add_file_routes(router: web.UrlDispatcher, store: FileStore, front: Front) -> None:
    """Serve POST /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content and DELETE /v1/files/{id}."""

    async def upload(request: web.Request) -> web.Response:
        headers, refused = front.admit(request)
        if refused is not None:
            return refused
        form = await _read_upload(request)
        if isinstance(form, str):
            return error_reply(400, form, headers)
        filename, purpose, data, expires_after = form
        stored = store.add(filename, purpose, data, expires_after=expires_after)
        await pause(front.stopping, front.reply_hold("upload"))
        return json_reply(stored.to_json(), headers)

    def found(handler: Callable[[StoredFile, dict[str, str]], Awaitable[web.Response]]) -> Handler:
        async def route(request: web.Request) -> web.Response:
            headers, refused = front.admit(request)
            if refused is not None:
                return refused
            file_id = request.match_info["file_id"]
            stored = store.get(file_id)
            if stored is None:
                return error_reply(404, f"No such File object: {file_id}", headers, param="id")
            return await handler(stored, headers)

        return route

    async def retrieve(stored: StoredFile, headers: dict[str, str]) -> web.Response:
        return json_reply(stored.to_json(), headers)

    async def content(stored: StoredFile, headers: dict[str, str]) -> web.Response:
        store.downloads += 1
        await pause(front.stopping, front.reply_hold("content"))
        return web.Response(body=stored.data, content_type="application/octet-stream", headers=headers)

    async def delete(stored: StoredFile, headers: dict[str, str]) -> web.Response:
        store.delete(stored.id)
        return json_reply({"id": stored.id, "object": "file", "deleted": True}, headers)

    router.add_post("/v1/files", upload)
    router.add_get("/v1/files/{file_id}", found(retrieve))
    router.add_delete("/v1/files/{file_id}", found(delete))
    router.add_get("/v1/files/{file_id}/content", found(content))


async def _read_upload(request: web.Request) -> tuple[str, str, bytes, int | None] | str:
    """(filename, purpose, data, expires_after seconds) of a multipart upload, or what is wrong with it.

    Parsed here rather than with aiohttp's multipart reader, which warns (deprecated internals) on some chunk
    boundaries; a simulator under a warnings-are-errors test run must not fail an upload for that.
    """
    boundary = _BOUNDARY.search(request.headers.get("Content-Type", ""))
    if not request.content_type.startswith("multipart/") or boundary is None:
        return "Uploads must be multipart/form-data with a 'file' and a 'purpose' field."
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            return f"File is too large: the limit is {MAX_FILE_BYTES // (1024 * 1024)} MB."
        chunks.append(chunk)
    fields: dict[str, str] = {}
    filename, data = None, b""
    for disposition, value in _parts(b"".join(chunks), boundary.group(1).strip('"').encode()):
        name = _PARAM_NAME.search(disposition)
        given = _PARAM_FILENAME.search(disposition)
        if name is None:
            continue
        if name.group(1) == "file":
            filename, data = (given.group(1) if given else "upload"), value
        else:
            fields[name.group(1)] = value.decode("utf-8", "replace")
    purpose = fields.get("purpose")
    if filename is None:
        return "Missing required parameter: 'file'."
    if purpose not in UPLOAD_PURPOSES:
        return f"Invalid value for 'purpose': expected one of {sorted(UPLOAD_PURPOSES)}, got {purpose!r}."
    if purpose == "batch":
        if not filename.endswith(".jsonl"):
            return f"Invalid file format for Batch API. Must be .jsonl, got {filename!r}."
        if len(data) > MAX_BATCH_FILE_BYTES:
            return f"Batch input files may be at most 200 MB; this one is {len(data):,} bytes. Split it."
    expires_after = None
    if "expires_after[seconds]" in fields:
        try:
            expires_after = int(fields["expires_after[seconds]"])
        except ValueError:
            return "Invalid 'expires_after[seconds]': expected an integer."
    return filename, purpose, data, expires_after


def _parts(body: bytes, boundary: bytes) -> Iterator[tuple[str, bytes]]:
    """(Content-Disposition, content) of each part of a multipart body."""
    for piece in body.split(b"--" + boundary)[1:]:
        if piece.startswith(b"--"):
            return  # the closing delimiter
        head, _, content = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        yield disposition, content.removesuffix(b"\r\n")


def json_reply(value: Any, headers: dict[str, str], status: int = 200) -> web.Response:
    """A JSON reply with the request-id headers."""
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json", headers=headers)


def error_reply(
    status: int, message: str, headers: dict[str, str], *, code: str | None = None, param: str | None = None
) -> web.Response:
    """An OpenAI-shaped error reply."""
    body = error_body(message, "invalid_request_error", code, param)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
