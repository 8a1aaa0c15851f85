"""The Files and Batch API calls the batch engine makes, through the unmodified `AsyncOpenAI` client.

Transient failures (429, 408, 409, 5xx, timeouts, dropped connections) are retried with the run's backoff;
a bad key stops the run (`FatalApiError`); anything else the API refuses becomes a `BatchError` that says
what to do. `create` is the one call that is never retried blindly: after a failure whose outcome is unknown,
the caller looks the batch up first (see `submit.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
from openai.types import Batch

from pipeline.engines.batch.files import ENDPOINT
from pipeline.errors import BatchError, FatalApiError, redact
from pipeline.ratelimit.limiter import RetryPolicy, Sleep

T = TypeVar("T")
# Batch API calls are few; a patient policy costs nothing and rides out a provider's bad minute.
DEFAULT_RETRY = RetryPolicy(max_attempts=8, base_wait=1.0, max_wait=30.0, timeout=120.0)


class Uncertain(Exception):  # noqa: N818 - a state, not a failure: the call may or may not have happened
    """A create whose outcome is unknown (no reply, or a server error): look before creating again."""


class BatchApi:
    """Files and batches at one endpoint, with one retry policy."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.retry, self.sleep, self.rng = retry, sleep, rng or random.Random()
        self._secret = api_key
        self._sdk = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=retry.timeout)

    @property
    def where(self) -> str:
        """The endpoint, for messages."""
        return str(self._sdk.base_url).rstrip("/")

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._sdk.close()

    async def upload(self, path: Path, filename: str) -> str:
        """Upload a request file (purpose "batch"); its file id."""

        async def call() -> str:
            with path.open("rb") as handle:
                return (await self._sdk.files.create(file=(filename, handle), purpose="batch")).id

        return await self._retrying("upload a request file", call)

    async def create(self, input_file_id: str, metadata: dict[str, str]) -> Batch:
        """Create a batch; raises `Uncertain` when it may or may not have been created."""
        try:
            return await self._sdk.batches.create(
                input_file_id=input_file_id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata
            )
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise Uncertain(self._describe(exc)) from None
        except openai.APIStatusError as exc:
            if exc.status_code == 429 or exc.status_code >= 500 or exc.status_code in (408, 409):
                raise Uncertain(self._describe(exc)) from None
            raise self._refused("create a batch", exc) from None

    async def retrieve(self, batch_id: str) -> Batch:
        """The batch as the provider sees it now."""
        return await self._retrying(f"look at batch {batch_id}", lambda: self._sdk.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> Batch:
        """Ask the provider to cancel a batch (it keeps what has finished)."""
        return await self._retrying(f"cancel batch {batch_id}", lambda: self._sdk.batches.cancel(batch_id))

    async def batches(self, page_size: int = 100) -> AsyncIterator[Batch]:
        """Every batch of the account, the newest first (one page at a time, retried page by page)."""
        after: str | None = None
        while True:
            page = await self._retrying("list batches", lambda: self._page(page_size, after))  # noqa: B023 - awaited at once
            for batch in page.data:
                yield batch
            if not page.data or not page.has_more:
                return
            after = page.data[-1].id

    async def _page(self, size: int, after: str | None) -> Any:
        if after is None:
            return await self._sdk.batches.list(limit=size)
        return await self._sdk.batches.list(limit=size, after=after)

    async def download(self, file_id: str, path: Path) -> None:
        """Save a file's content to `path` (written under a temporary name, renamed when complete)."""
        tmp = path.with_name(f".{path.name}.tmp")

        async def call() -> None:
            async with self._sdk.files.with_streaming_response.content(file_id) as response:
                with tmp.open("wb") as handle:
                    async for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
            tmp.replace(path)

        try:
            await self._retrying(f"download file {file_id}", call)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file at the provider (best effort: False when it could not)."""
        try:
            await self._sdk.files.delete(file_id)
        except openai.OpenAIError:
            return False
        return True

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                failure: str = self._describe(exc)
            except openai.APIStatusError as exc:
                if not (exc.status_code == 429 or exc.status_code >= 500 or exc.status_code in (408, 409)):
                    raise self._refused(what, exc) from None
                failure = self._describe(exc)
            if attempt >= self.retry.max_attempts:
                raise BatchError(
                    f"could not {what} at {self.where} after {attempt} attempts ({failure}). Nothing is lost: "
                    "re-run the same command to carry on where this run stopped."
                )
            await self.sleep(self.retry.backoff(attempt, self.rng))

    def _refused(self, what: str, exc: openai.APIStatusError) -> Exception:
        text = self._describe(exc)
        if exc.status_code in (401, 403):
            return FatalApiError(
                f"{self.where} rejected the API key ({text}). Set OPENAI_API_KEY to a valid key for this endpoint.",
                status=exc.status_code,
            )
        if exc.status_code == 404 and what in ("upload a request file", "create a batch", "list batches"):
            return BatchError(
                f"{self.where} has no Batch API ({text}). For a server without one (vLLM, for example), write "
                "request files with `labelstream batch prepare`, run them there, and merge the results with "
                "`labelstream batch ingest`."
            )
        if exc.status_code == 404 and what.startswith("look at batch"):
            return BatchError(
                f"{self.where} does not know the batch (could not {what}: {text}). If it was sent with another key, "
                "use that one. Only if it is gone for good (a restarted simulator, a deleted project), move the "
                "sink's .meta/batches.json aside and re-run: the rows of batches not yet collected are sent again."
            )
        return BatchError(f"could not {what}: {text}")

    def _describe(self, exc: openai.OpenAIError) -> str:
        if isinstance(exc, openai.APIStatusError):
            body: Any = exc.body
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                body = body["error"]
            message = body.get("message") if isinstance(body, dict) else None
            text = f"HTTP {exc.status_code}: {message or exc.message}"
        elif isinstance(exc, openai.APITimeoutError):
            text = "no reply in time"
        else:
            inner = exc.__cause__ or exc.__context__
            text = f"connection failed: {type(inner).__name__}: {inner}" if inner else str(exc)
        return redact(text[:400], self._secret)
