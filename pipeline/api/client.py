"""One row → one label: the API call, its timeout, retry classification and backoff.

`LabelClient.label(row)` returns `Labeled` or `Failed` and never raises for a row's own trouble; it
raises `FatalApiError` only when every other row would fail the same way (bad key, unknown model,
no quota), so the run stops early instead of dead-lettering everything.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from contextvars import ContextVar

import httpx2
import openai
import orjson

from pipeline.api.endpoints import Endpoint, EndpointPool, Outcome
from pipeline.api.errors import Meaning, classify, refusal_kind
from pipeline.api.failures import FailureWatch, advice, connection_problem, gateway_of, roomier
from pipeline.api.hedging import Attempt, Hedger
from pipeline.api.request import Reply, read_reply, rejects_logprobs, request_body
from pipeline.api.timeouts import AdaptiveTimeout
from pipeline.api.tokens import TokenEstimator
from pipeline.errors import FatalApiError, redact
from pipeline.ratelimit.headers import retry_after_seconds
from pipeline.ratelimit.limiter import Limiter, RetryPolicy, Sleep
from pipeline.results import Failed, Labeled, Row, now_iso
from pipeline.stats import CallStats
from pipeline.task.prompt import Prompt, ReplyError

# Consecutive 400s, with no success at all, after which we call the request itself broken.
_BAD_REQUEST_BREAKER = 20
# Timed-out attempts, with no reply at all yet, after which the server is called down or slower than --timeout.
_TIMEOUT_BREAKER = 20
_JSON_HEADERS = {"Content-Type": "application/json"}
# 429-answered attempts a row may take beyond its --max-retries before it is dead-lettered anyway.
_RATE_LIMITED_CAP = 100
# Failures that say "later" or "not like this" about the whole run rather than the row: no retry used up (a rate
# limit, a gateway holding requests, flex out of capacity, an endpoint refusing logprobs).
# An endpoint that cannot be reached before anything succeeded: the run stops once every endpoint is.
_FREE_RETRIES = frozenset({"rate_limit", "held", "resource_unavailable", "logprobs_refused", "unreachable"})
# Of those, the ones the limiter already answered with a pause: no backoff on top.
_PAUSED = frozenset({"rate_limit", "held", "logprobs_refused"})
# Failures that say something about the server (not about the row or the reply): the pool backs it off.
_SERVER_TROUBLE = frozenset({"connection", "unreachable", "timeout", "server_error", "rate_limit"})
# The endpoint the current worker's attempt uses (each worker is a task of its own, with its own context).
_ENDPOINT: ContextVar[Endpoint[openai.AsyncOpenAI] | None] = ContextVar("labelstream_endpoint", default=None)


class _Attempt(Exception):  # noqa: N818 - internal signal, never leaves this module
    def __init__(self, kind: str, message: str, *, status: int | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.kind, self.message, self.status, self.retry = kind, message, status, retry
        self.retry_after: float | None = None


class LabelClient:
    """Labels rows with one `AsyncOpenAI` client shared by all workers."""

    def __init__(
        self,
        *,
        prompt: Prompt,
        limiter: Limiter,
        model: str,
        api_key: str,
        base_url: str | Sequence[str | None] | None,
        retry: RetryPolicy,
        stats: CallStats | None = None,
        exact_tokens: bool = False,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        service_tier: str | None = None,
    ) -> None:
        self.prompt = prompt
        self.service_tier = service_tier  # "flex": half price, slower, may answer 429 resource_unavailable
        self.limiter = limiter
        self.model = model
        self.retry = retry
        self.stats = stats or CallStats()
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.tokens = TokenEstimator(model, prompt.prefix)
        self.exact_tokens = exact_tokens
        self.logprobs = True  # turned off for the run when the endpoint refuses them
        self.timeouts = AdaptiveTimeout(retry.timeout)
        self.hedger = Hedger(self.timeouts, limiter, self.stats, self._attempt_on_endpoint)
        self._secret = api_key
        urls = [base_url] if base_url is None or isinstance(base_url, str) else list(base_url)
        # The SDK's pool holds 1,000 connections; at high tiers and slow models more may be in flight.
        pool = httpx2.Limits(max_connections=limiter.ceiling, max_keepalive_connections=limiter.ceiling)
        sdks = [
            openai.AsyncOpenAI(
                api_key=api_key,
                base_url=url,
                max_retries=0,  # one retry policy rules: ours, which also slows the whole run on 429
                timeout=retry.timeout,
                http_client=openai.DefaultAioHttpClient(timeout=retry.timeout, limits=pool),
            )
            for url in urls
        ]
        self.endpoints = EndpointPool([(str(sdk.base_url).rstrip("/"), sdk) for sdk in sdks])
        self.watch = FailureWatch(self.stats, len(sdks))  # failures that say every row would fail alike

    @property
    def _sdk(self) -> openai.AsyncOpenAI:
        """The SDK client of the server this worker's attempt goes to."""
        endpoint = _ENDPOINT.get()
        return (endpoint or self.endpoints.first).client

    @property
    def _where(self) -> str:
        """The base URL of the server this worker's attempt goes to."""
        return f"{self._sdk.base_url}".rstrip("/")

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        self.hedger.close()
        for endpoint in self.endpoints.endpoints:
            await endpoint.client.close()

    def estimate_tokens(self, row: Row) -> int:
        """Tokens a request for `row` may cost against a TPM limit: prompt estimate plus max_tokens."""
        if self.exact_tokens and self.limiter.tpm_limited and not self.tokens.exact:
            self.tokens.load_exact()  # from now on counts matter; until it has loaded, the estimate serves
        return self.tokens.prompt_tokens(row.text) + self.prompt.config.max_tokens

    def input_ended(self) -> None:
        """The run has no more rows to send: its last stragglers may be hedged from now on."""
        self.hedger.input_ended()

    async def label(self, row: Row) -> Labeled | Failed:
        """Label one row, retrying what may succeed on a later attempt."""
        estimate = self.estimate_tokens(row)
        attempt = limited = 0
        max_tokens = self.prompt.config.max_tokens
        while True:
            attempt += 1
            live = Attempt(self.timeouts, row, estimate, attempt, max_tokens=max_tokens)
            try:
                return await self._attempt_on_endpoint(live)
            except _Attempt as failure:
                if (copied := await self.hedger.outcome(live)) is not None:
                    return copied  # this attempt failed, but its copy replied
                # 429s say "later", not "never": they do not use up the row's retries (up to a sanity cap).
                limited += failure.kind in _FREE_RETRIES
                spent = attempt - limited
                if failure.kind == "length":
                    # The same request would be cut off the same way: one more try with room to finish, no more.
                    more = roomier(max_tokens) if max_tokens == self.prompt.config.max_tokens else max_tokens
                    estimate, max_tokens, failure.retry = estimate + more - max_tokens, more, more > max_tokens
                    if not failure.retry:
                        failure.message = f"{failure.message} (max_tokens {max_tokens}): {advice('length')}"
                if not failure.retry or spent >= self.retry.max_attempts or limited >= _RATE_LIMITED_CAP:
                    return Failed(
                        row=row,
                        kind=failure.kind,
                        message=redact(failure.message, self._secret),
                        attempts=attempt,
                        status=failure.status,
                        failed_at=now_iso(),
                    )
                self.stats.retries += 1
                if failure.kind not in _PAUSED:  # after a 429 the limiter already pauses everyone
                    await self.sleep(self.retry.backoff(attempt, self.rng))
            finally:
                self.hedger.drop(live)

    async def _attempt_on_endpoint(self, live: Attempt) -> Labeled:
        """One attempt on the server the pool picks (the only one, usually); tells the pool how it went."""
        endpoint = self.endpoints.pick()
        token = _ENDPOINT.set(endpoint)
        outcome, latency = Outcome.NEUTRAL, None
        try:
            result = await self._attempt(live)
            if result is not live.won:  # a copy's reply says nothing of this server, which did not answer
                outcome, latency = Outcome.OK, result.latency_ms / 1000
            return result
        except _Attempt as failure:
            if failure.kind in _SERVER_TROUBLE:
                outcome = Outcome.FAILED
            raise
        finally:
            _ENDPOINT.reset(token)
            self.endpoints.done(endpoint, outcome, latency)

    async def _attempt(self, live: Attempt) -> Labeled:
        row, max_tokens = live.row, live.max_tokens or self.prompt.config.max_tokens
        async with self.limiter.slot(live.estimate) as permit:
            started = time.perf_counter()
            try:
                async with live:  # ends at its start + the timeout, even when the timeout is learned later
                    response, body = await self._post(row.text, max_tokens)
            except TimeoutError:
                self._abandoned(live.estimate - max_tokens, max_tokens, timed_out=live.won is None)
                if live.won is not None:
                    return live.won  # a copy replied first (hedging.py)
                raise self._timed_out(live.limit) from None
            except asyncio.CancelledError:  # the run is stopping, or a copy lost: it may still run upstream
                self._abandoned(live.estimate - max_tokens, max_tokens, timed_out=False)
                raise
            except openai.APIStatusError as exc:
                raise self._status_failure(exc) from None
            except openai.APIConnectionError as exc:  # also APITimeoutError, which a refused connection raises
                raise self._connection_failure(exc, live.estimate - max_tokens, max_tokens) from None
            replied = time.perf_counter()
            latency_ms = (replied - started) * 1000
            self.timeouts.note_reply(replied - started, replied)
            self.limiter.observe_headers(response.headers)
            self.stats.gateway = self.stats.gateway or gateway_of(response.headers)
            try:
                reply = read_reply(self.prompt, body)
            except ReplyError as exc:
                self.watch.unusable(exc, body, response.headers.get("content-type"), self._where)
                raise _Attempt(exc.kind, exc.message) from None
            prompt_tokens = reply.prompt_tokens
            if prompt_tokens:
                # Providers reserve max_tokens for the reply; only the prompt part of our estimate can be off.
                permit.used_tokens = prompt_tokens + max_tokens
                self.tokens.observe(row.text, prompt_tokens)
            self.limiter.on_success(permit)
        return self._labeled(live, reply, latency_ms)

    async def _post(self, text: str, max_tokens: int) -> tuple[httpx2.Response, bytes]:
        """Send one chat-completion request; its response and body.

        The SDK's documented low-level post: same auth, errors and transport as chat.completions.create, minus
        its per-request walk of the params against their TypedDicts, which cost more CPU than everything else a
        row needs.
        """
        body = request_body(
            self.prompt,
            text,
            self.model,
            logprobs=self.logprobs,
            service_tier=self.service_tier,
            max_tokens=max_tokens,
        )
        response = await self._sdk.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=orjson.dumps(body),
            options={"headers": _JSON_HEADERS},
        )
        return response, await response.aread()

    def _labeled(self, live: Attempt, reply: Reply, latency_ms: float) -> Labeled:
        """Count a usable reply and make its row's record."""
        self.stats.successes += 1
        self.stats.bad_requests_in_a_row = 0
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        self.stats.cached_tokens += reply.cached_tokens
        self.stats.logprobs_unread += reply.logprobs_unread
        return Labeled(
            row=live.row,
            label=reply.label,
            model=reply.model or self.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            latency_ms=round(latency_ms, 1),
            attempts=live.number,
            labeled_at=now_iso(),
            cached_tokens=reply.cached_tokens,
            confidence=reply.confidence,
            extras=reply.extras,
        )

    def _timed_out(self, limit: float) -> _Attempt:
        if self.stats.successes == 0:
            # Nothing has come back yet: no overload to wait out, and holding on would retry forever (each
            # "held" timeout is free) against a server that is down or always slower than --timeout.
            self.stats.timeouts_before_any_reply += 1
            if self.stats.timeouts_before_any_reply >= _TIMEOUT_BREAKER:
                raise FatalApiError(
                    f"the first {_TIMEOUT_BREAKER} requests to {self._sdk.base_url} got no reply within "
                    f"{limit:g} s. The server is down or slower than that: check it, or raise --timeout "
                    "(slow reasoning models can need minutes), then re-run the same command to resume.",
                    cause="timeout",
                )
        if self.timeouts.note_timeout(time.perf_counter()):
            # Many at once: a gateway holding requests over its limit, or a drowning provider. Slow the run down
            # like a 429, and do not count it against the rows (nor call it a 429: none came).
            self.stats.held += 1
            self.limiter.on_rate_limited(None, refused=False)
            return _Attempt("held", f"no reply within {limit:.3g} s while many others timed out too (overload)")
        p99 = self.timeouts.p99
        recent = f" (recent replies: p99 {p99:.3g} s)" if p99 is not None and limit < self.retry.timeout else ""
        return _Attempt("timeout", f"no reply within {limit:.3g} s{recent}")

    def _status_failure(self, exc: openai.APIStatusError) -> _Attempt:
        where, status = self._where, exc.status_code
        self.stats.gateway = self.stats.gateway or gateway_of(exc.response.headers)
        self.watch.error_reply(status, exc.response.headers.get("content-type"), exc.body, where)
        error = classify(status, exc.body, str(exc.message))
        meaning = error.meaning
        text = redact(error.describe(), self._secret)
        if meaning is Meaning.QUOTA:
            raise FatalApiError(
                f"the API says the account is out of quota ({text}). Add credit or use another key, "
                "then re-run the same command to resume.",
                status=status,
                cause="quota",
            )
        if status == 429 and error.code == "resource_unavailable":
            # Flex has no capacity right now: back off and retry, but it is no rate limit, so the run's pace
            # stays as it is (no pause, no smaller window, not counted as a 429 overload).
            self.stats.unavailable += 1
            return _Attempt("resource_unavailable", text, status=status)
        if meaning is Meaning.RATE_LIMIT:
            self.stats.rate_limited += 1
            failure = _Attempt("rate_limit", text, status=status)
            failure.retry_after = retry_after_seconds(exc.response.headers)
            self.limiter.on_rate_limited(failure.retry_after)
            return failure
        if meaning is Meaning.KEY:
            raise FatalApiError(
                f"{where} rejected the API key ({text}). Set OPENAI_API_KEY to a valid key for this endpoint.",
                status=status,
                cause="key",
            )
        if meaning is Meaning.MODEL:
            raise FatalApiError(
                f"{where} does not serve model {self.model!r} ({text}). Pass --model with a model this "
                "endpoint serves (or check --base-url).",
                status=status,
                cause="model",
            )
        if rejects_logprobs(status, error.code, error.message):
            # E.g. a reasoning model: label without confidence rather than fail. Also for replies to requests
            # sent before the first refusal turned logprobs off.
            self.logprobs = False
            return _Attempt("logprobs_refused", text, status=status)
        if meaning is Meaning.RETRY:
            return _Attempt("server_error" if status >= 500 else f"http_{status}", text, status=status)
        self.stats.bad_requests_in_a_row += 1
        if self.stats.successes == 0 and self.stats.bad_requests_in_a_row >= _BAD_REQUEST_BREAKER:
            raise FatalApiError(
                f"the first {_BAD_REQUEST_BREAKER} requests were all rejected ({text}); the request itself "
                "looks wrong for this endpoint (model, response_format, max_tokens?).",
                status=status,
            )
        return _Attempt(refusal_kind(error.code, error.message), text, status=status, retry=False)

    def _connection_failure(self, exc: openai.APIConnectionError, prompt_tokens: int, max_tokens: int) -> _Attempt:
        if (problem := connection_problem(exc)) is not None:
            kind = self.watch.no_connection(self._where, problem)
            return _Attempt(kind, f"cannot connect to {self._where}: {problem[0]}")
        if isinstance(exc, openai.APITimeoutError):
            self._abandoned(prompt_tokens, max_tokens)
            return _Attempt("timeout", f"no reply within {self.retry.timeout:g} s")
        return _Attempt("connection", f"connection failed: {_cause(exc)}")

    def _abandoned(self, prompt_tokens: int, max_tokens: int, *, timed_out: bool = True) -> None:
        # The request may still run upstream and be billed: count its worst case (an upper bound).
        self.stats.abandoned += 1
        self.stats.timeouts += timed_out
        self.stats.abandoned_prompt_tokens += max(0, prompt_tokens)
        self.stats.abandoned_completion_tokens += max_tokens


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    return f"{type(inner).__name__}: {inner}" if inner else str(exc)
