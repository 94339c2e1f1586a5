"""Client for OpenAI-compatible upstreams (OpenAI, Anthropic's compatibility API, Gradient, Ollama, vLLM,
another tierserve): one `ProviderClient` per provider, holding its connection pool.

`start()` returns either a complete answer (`Completed`) or a stream whose first SSE event has already
arrived (`Streaming`). Everything before that first event is retried with exponential backoff and full
jitter, within `timeout_total_s`, and finally raised as `UpstreamError` for the caller to fail over:
connection errors, timeouts, 5xx/429/408, bad keys and models (401/403/404, no retry on the same
provider), a 200 stream that ends or errors before its first event (Anthropic's "Overloaded"). Once the
first event is returned nothing is retried or silently continued elsewhere (Envoy: "we don't retry if we
already started the response"): a later failure, a cut, a stall past `timeout_read_s`, an upstream error
event or a stream ending without `[DONE]` becomes one in-stream error event in our envelope, and counts
as a failure of the provider.

Each call reports exactly one outcome: to the provider's breaker (success / failure / release), to the
budget (tokens and cost, streams included: `stream_options.include_usage` is requested upstream and the
usage chunk dropped again when the client did not ask for it; a stream cut before its usage records an
estimate), and to an optional callback.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from serving.backends.breaker import Breaker
from serving.config import Endpoint, Provider
from serving.spend.ledger import Budget
from serving.wire.errors import APIError, retry_after
from serving.wire.items import Usage
from serving.wire.sse import is_done, is_error_event, with_usage

Verdict = Literal["ok", "failed", "client_error", "cancelled"]  # what a call tells the provider's breaker
PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completion": "/completions"}
CLIENT_ERRORS = frozenset({400, 413, 422})  # the request's fault: another attempt or provider won't help
NO_RETRY_SAME = frozenset({401, 403, 404})  # the provider's config (key, model): fail over, don't retry it


@dataclass(frozen=True, slots=True)
class Outcome:
    provider: str
    tier: str
    endpoint: str
    stream: bool
    result: Verdict
    attempts: int
    latency_s: float | None  # to the first event (stream) or the whole answer
    usage: Usage | None
    error: str | None = None


@dataclass(slots=True)
class Completed:
    """A whole answer: 200 with the upstream's JSON, or the upstream's 4xx in our envelope."""

    status: int
    body: bytes
    usage: Usage | None
    attempts: int


class UpstreamError(APIError):
    """The provider could not start an answer (all attempts spent): fail over to the next candidate."""

    def __init__(self, status: int, message: str, *, attempts: int, retry_after_s: float | None = None) -> None:
        headers = retry_after(retry_after_s) if retry_after_s else None
        super().__init__(status, message, code="upstream_unavailable" if status >= 500 else None, headers=headers)
        self.attempts = attempts


class _Retry(Exception):
    """One attempt failed before the first byte."""

    def __init__(self, status: int, detail: str, *, again: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.again = again  # worth another attempt on the same provider
        self.retry_after_s = retry_after_s


class Streaming:
    """SSE bytes for the client, first event included; usage and outcome are reported after the end.

    Iterate it to the end or `aclose()` it: either way the upstream response is closed and the outcome
    reported once (a stream dropped before its first iteration counts as cancelled).
    """

    def __init__(self, attempts: int, abandon: Callable[[], Awaitable[None]]) -> None:
        self.status = 200
        self.attempts = attempts
        self.events: AsyncGenerator[bytes, None] | None = None  # set by the client once the stream is open
        self.usage: Usage | None = None  # the upstream's usage (or an estimate), once the stream has ended
        self._abandon = abandon
        self._started = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        assert self.events is not None
        return await self.events.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            await self._abandon()
        if self.events is not None:
            await self.events.aclose()


class ProviderClient:
    def __init__(
        self,
        provider: Provider,
        *,
        breaker: Breaker | None = None,
        budget: Budget | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 4.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self.breaker = breaker
        self.budget = budget
        self.on_outcome = on_outcome
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.base_url = provider.base_url.rstrip("/")
        env = os.environ if env is None else env
        self.key_missing = bool(provider.api_key_env) and not env.get(provider.api_key_env or "")
        headers = {"user-agent": "tierserve", "accept": "application/json, text/event-stream"}
        if provider.api_key_env and not self.key_missing:
            headers["authorization"] = f"Bearer {env[provider.api_key_env]}"
        p = provider
        # read: the longest silence between bytes; the total deadline is ours (see start()).
        timeout = httpx.Timeout(connect=p.timeout_connect_s, read=p.timeout_read_s, write=p.timeout_read_s, pool=5)
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- the call -----------------------------------------------------------------------------------

    async def start(
        self, endpoint: Endpoint, body: Mapping[str, Any], *, tier: str, stream: bool, prompt_tokens: int = 0
    ) -> Completed | Streaming:
        """Send `body` (the client's request) to this provider on behalf of `tier`.

        `prompt_tokens` (the router's estimate) is what a stream cut before its usage is charged for.
        Raises UpstreamError when no answer could be started (breaker open, key missing, retries spent).
        """
        name = self.provider.name
        model = self.provider.upstream_model(tier)
        if model is None or endpoint not in self.provider.endpoints:
            raise UpstreamError(503, f"provider {name} does not serve tier {tier} on {endpoint}", attempts=0)
        if self.key_missing:
            self._report(tier, endpoint, stream, "failed", 0, None, None, f"{self.provider.api_key_env} is not set")
            raise UpstreamError(503, f"provider {name}: ${self.provider.api_key_env} is not set", attempts=0)
        if self.breaker is not None and not self.breaker.acquire():
            retry = self.breaker.retry_in_s()
            raise UpstreamError(503, f"provider {name}: breaker open", attempts=0, retry_after_s=retry)
        payload = {**body, "model": model, "stream": stream}
        client_usage = False
        if not stream:
            payload.pop("stream_options", None)  # vLLM answers 400 to stream_options without stream
        elif self.provider.stream_usage:
            payload, client_usage = with_usage(payload)
        else:
            client_usage = True  # nothing asked on the client's behalf, so nothing to hide from it
        url = self.base_url + PATHS[endpoint]
        started = self.clock()
        deadline = started + self.provider.timeout_total_s
        attempts = 0
        last: _Retry | None = None
        try:
            while True:
                attempts += 1
                try:
                    if stream:
                        events = await self._open_stream(url, payload, deadline)
                        first = await self._first_event(events, deadline)
                    else:
                        response = await self._post(url, payload, deadline)
                        return self._completed(response, tier, endpoint, attempts, started)
                except _Retry as exc:
                    last = exc
                else:
                    async def abandon(events: _Events = events, n: int = attempts) -> None:
                        await events.close()
                        cut = Usage(prompt_tokens, 0, estimated=True)
                        self._report(tier, endpoint, True, "cancelled", n, None, cut, None)

                    streaming = Streaming(attempts, abandon)
                    streaming.events = self._relay(
                        events, first, tier, endpoint, attempts, started, prompt_tokens, client_usage, streaming
                    )
                    return streaming
                if not self._again(last, attempts, deadline):
                    break
                await self.sleep(self._backoff(attempts, last, deadline))
        except asyncio.CancelledError:  # the client went away before an answer
            cut = Usage(prompt_tokens, 0, estimated=True)
            self._report(tier, endpoint, stream, "cancelled", attempts, None, cut, None)
            raise
        except _ClientError as exc:
            self._report(tier, endpoint, stream, "client_error", attempts, self.clock() - started, None, None)
            return Completed(exc.error.status, exc.error.json(), None, attempts)
        detail = f"provider {name}: {last.detail if last else 'no attempt'} (attempts: {attempts})"
        self._report(tier, endpoint, stream, "failed", attempts, self.clock() - started, None, detail)
        status = 504 if last is not None and last.status == 504 else 429 if last and last.status == 429 else 502
        raise UpstreamError(status, detail, attempts=attempts, retry_after_s=last.retry_after_s if last else None)

    def _again(self, last: _Retry, attempts: int, deadline: float) -> bool:
        return last.again and attempts <= self.provider.retries and self.clock() < deadline

    def _backoff(self, attempts: int, last: _Retry, deadline: float) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1)) * self.rand()
        if last.retry_after_s is not None:  # the upstream said when; never past our own deadline
            delay = max(delay, min(last.retry_after_s, self.backoff_max_s))
        return max(0.0, min(delay, deadline - self.clock()))

    # -- non-streamed ---------------------------------------------------------------------------------

    async def _post(self, url: str, payload: dict[str, Any], deadline: float) -> httpx.Response:
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                response = await self.http.post(url, content=orjson.dumps(payload), headers=_JSON)
        except TimeoutError:
            raise _Retry(504, f"no answer within timeout_total_s {self.provider.timeout_total_s:g}s") from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from None
        _check_status(response.status_code, response.content, response.headers)
        return response

    def _completed(
        self, response: httpx.Response, tier: str, endpoint: str, attempts: int, started: float
    ) -> Completed:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise _Retry(502, "upstream sent a 200 that is not JSON") from None
        usage = _usage(data.get("usage") if isinstance(data, dict) else None)
        self._report(tier, endpoint, False, "ok", attempts, self.clock() - started, usage, None)
        return Completed(200, response.content, usage, attempts)

    # -- streamed -------------------------------------------------------------------------------------

    async def _open_stream(self, url: str, payload: dict[str, Any], deadline: float) -> _Events:
        request = self.http.build_request("POST", url, content=orjson.dumps(payload), headers=_JSON)
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                response = await self.http.send(request, stream=True)
        except TimeoutError:
            raise _Retry(504, f"no response headers within {self.provider.timeout_total_s:g}s") from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from None
        if response.status_code != 200:
            try:
                async with asyncio.timeout(max(0.0, deadline - self.clock())):
                    content = await response.aread()
            except (TimeoutError, httpx.HTTPError):
                content = b""
            finally:
                await response.aclose()
            _check_status(response.status_code, content, response.headers)
        return _Events(response)

    async def _first_event(self, events: _Events, deadline: float) -> bytes:
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                first = await events.next()
        except TimeoutError:
            await events.close()
            raise _Retry(504, f"no first event within timeout_total_s {self.provider.timeout_total_s:g}s") from None
        except httpx.HTTPError as exc:
            await events.close()
            raise _transport_error(exc) from None
        if first is None:
            await events.close()
            raise _Retry(502, "upstream ended the stream before its first event")
        if is_error_event(first):
            await events.close()
            raise _Retry(502, f"upstream error event before the first token: {_error_message(first[6:])}")
        return first

    async def _relay(
        self,
        events: _Events,
        first: bytes,
        tier: str,
        endpoint: str,
        attempts: int,
        started: float,
        prompt_tokens: int,
        client_usage: bool,
        into: Streaming,
    ) -> AsyncGenerator[bytes, None]:
        ttfb = self.clock() - started
        usage: Usage | None = None
        chunks = 0  # content events: the completion estimate when no usage arrives
        error: str | None = None
        result: Verdict = "ok"
        event: bytes | None = first
        try:
            while event is not None:
                if is_done(event):
                    yield event
                    break
                if is_error_event(event):
                    error = f"upstream error event mid-stream: {_error_message(event[6:])}"
                    break
                if b'"usage":{' in event or b'"usage": {' in event:
                    parsed = _json(event[6:])
                    found = _usage(parsed.get("usage")) if parsed else None
                    usage = found or usage
                    if found and parsed is not None and not parsed.get("choices") and not client_usage:
                        event = await events.next()
                        continue  # asked for accounting only
                else:
                    chunks += 1
                yield event
                event = await events.next()
            else:
                error = "upstream ended the stream without [DONE]"
        except httpx.ReadTimeout:
            error = f"upstream stalled longer than timeout_read_s {self.provider.timeout_read_s:g}s"
        except httpx.HTTPError as exc:
            error = f"upstream stream broke: {type(exc).__name__}: {exc}"[:300]
        except (asyncio.CancelledError, GeneratorExit):
            result = "cancelled"  # the client went away; closing the response stops the upstream work
            raise
        finally:
            await events.close()
            if result != "cancelled" and error is not None:
                result = "failed"
            final = usage or Usage(prompt_tokens, chunks, estimated=True)
            into.usage = final
            self._report(tier, endpoint, True, result, attempts, ttfb, final, error)
        if error is not None:
            yield APIError(502, f"provider {self.provider.name}: {error}", code="upstream_stream_error").sse()

    # -- reporting ----------------------------------------------------------------------------------

    def _report(
        self,
        tier: str,
        endpoint: str,
        stream: bool,
        result: Verdict,
        attempts: int,
        latency_s: float | None,
        usage: Usage | None,
        error: str | None,
    ) -> None:
        if self.breaker is not None:
            if result == "failed":
                self.breaker.failure(error or "failed", latency_s)
            elif result == "cancelled":
                self.breaker.release()
            else:  # ok, or a client error the provider answered properly
                self.breaker.success(latency_s)
        if self.budget is not None and usage is not None:
            self.budget.record(
                "provider", self.provider.name, usage.prompt_tokens, usage.completion_tokens, estimated=usage.estimated
            )
        if self.on_outcome is not None:
            outcome = Outcome(self.provider.name, tier, endpoint, stream, result, attempts, latency_s, usage, error)
            self.on_outcome(outcome)


_JSON = {"content-type": "application/json"}


class _ClientError(Exception):
    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class _Events:
    """SSE events (each ending in a blank line) out of an httpx streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.raw = response.aiter_bytes()
        self.buffer = b""

    async def next(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\n\n")
            if end >= 0:
                event, self.buffer = self.buffer[: end + 2], self.buffer[end + 2 :]
                if event.strip() and not event.startswith(b":"):  # skip keep-alive comments
                    return event
                continue
            try:
                data = await self.raw.__anext__()
            except StopAsyncIteration:
                rest, self.buffer = self.buffer.strip(), b""
                return rest + b"\n\n" if rest else None
            self.buffer += data.replace(b"\r\n", b"\n")

    async def close(self) -> None:
        await self.response.aclose()


def _check_status(status: int, content: bytes, headers: httpx.Headers) -> None:
    if status < 400:
        return
    message = _error_message(content) or f"HTTP {status}"
    if status in CLIENT_ERRORS:
        parsed = _json(content)
        error = parsed.get("error") if parsed else None
        code = error.get("code") if isinstance(error, dict) else None
        param = error.get("param") if isinstance(error, dict) else None
        lowered = message.lower()
        if "context length" in lowered or "maximum context" in lowered:
            code = "context_length_exceeded"
        raise _ClientError(APIError(status, message, param=param, code=code if isinstance(code, str) else None))
    retry_after = None
    try:
        retry_after = float(headers.get("retry-after", ""))
    except ValueError:
        pass
    detail = f"upstream {status}: {message}"[:300]
    raise _Retry(status, detail, again=status not in NO_RETRY_SAME, retry_after_s=retry_after)


def _transport_error(exc: httpx.HTTPError) -> _Retry:
    status = 504 if isinstance(exc, httpx.TimeoutException) else 502
    return _Retry(status, f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__)


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _error_message(data: bytes) -> str:
    parsed = _json(data.strip())
    error = parsed.get("error") if parsed else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")[:300]
    if isinstance(error, str):
        return error[:300]
    return data[:200].decode(errors="replace")


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int):
        return None
    return Usage(prompt, completion if isinstance(completion, int) else 0)
