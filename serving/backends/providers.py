"""Client for the fallback upstreams (OpenAI, Anthropic, Gradient, Ollama, vLLM, another tierserve): one
`ProviderClient` per provider, holding its connection pool. Every endpoint is spoken in its own protocol,
as `PROTOCOLS` describes: OpenAI's chat, completion, responses and embeddings, Anthropic's messages and
count_tokens (natively on `kind: anthropic`, with its own auth headers).

`start()` returns either a complete answer (`Completed`) or a stream whose first SSE event has already
arrived (`Streaming`). Everything before that first event is retried with exponential backoff and full
jitter, within `timeout_total_s`, and finally raised as `UpstreamError` for the caller to fail over:
connection errors, timeouts, 5xx/429/408, bad keys and models (401/403/404, no retry on the same
provider), a 200 stream that ends or errors before its first event (Anthropic's "Overloaded"). For the
Responses and Messages streams the "first event" is the first one after their preamble (`message_start`,
`response.created`, ...), which is held back until then. Once the first event is returned nothing is
retried or silently continued elsewhere (Envoy: "we don't retry if we already started the response"): a
later failure, a cut, a stall past `timeout_read_s`, an upstream error event or a stream ending without
its last event (`[DONE]`, `message_stop`, `response.completed`) becomes one in-stream error event, and
counts as a failure of the provider.

Each call reports exactly one outcome: to the provider's breaker (success / failure / release), to the
budget (tokens and cost, streams included: chat and completion streams ask for
`stream_options.include_usage` and drop the usage chunk again when the client did not ask for it; the
Responses and Messages streams carry their usage in their own events; a stream cut before its usage
records an estimate), and to an optional callback.
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
from serving.wire.errors import APIError, protocol_of, render_sse, retry_after
from serving.wire.items import Usage
from serving.wire.sse import is_done, is_error_event, with_usage

Verdict = Literal["ok", "failed", "client_error", "cancelled"]  # what a call tells the provider's breaker
CLIENT_ERRORS = frozenset({400, 413, 422})  # the request's fault: another attempt or provider won't help
NO_RETRY_SAME = frozenset({401, 403, 404})  # the provider's config (key, model): fail over, don't retry it
ANTHROPIC_VERSION = "2023-06-01"
# An event's usage as (so far, event name, event data) -> usage so far; a partial count is marked estimated.
StreamUsage = Callable[[Usage | None, str, dict[str, Any]], Usage | None]


def _tokens(raw: Any, input_key: str, output_key: str, *, estimated: bool = False) -> Usage | None:
    """`raw[input_key]` / `raw[output_key]` as a Usage (None without a prompt count)."""
    if not isinstance(raw, dict) or not isinstance(prompt := raw.get(input_key), int):
        return None
    completion = raw.get(output_key)
    return Usage(prompt, completion if isinstance(completion, int) else 0, estimated=estimated)


def _openai_usage(usage: Any) -> Usage | None:
    return _tokens(usage, "prompt_tokens", "completion_tokens")


def _io_usage(usage: Any) -> Usage | None:
    """The Responses and Messages APIs' names."""
    return _tokens(usage, "input_tokens", "output_tokens")


def _responses_stream_usage(_: Usage | None, __: str, data: dict[str, Any]) -> Usage | None:
    response = data.get("response")
    return _io_usage(response.get("usage")) if isinstance(response, dict) else None


def _messages_stream_usage(so_far: Usage | None, name: str, data: dict[str, Any]) -> Usage | None:
    """`message_start` has the input tokens (output not yet known: estimated until a `message_delta`, whose
    `usage` is cumulative, and lately may repeat the input count)."""
    if name == "message_start":
        message = data.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        return _tokens(usage, "input_tokens", "output_tokens", estimated=True)
    usage = data.get("usage")
    if not isinstance(usage, dict) or not isinstance(output := usage.get("output_tokens"), int):
        return None
    prompt = usage.get("input_tokens")
    return Usage(prompt if isinstance(prompt, int) else so_far.prompt_tokens if so_far else 0, output)


@dataclass(frozen=True, slots=True)
class Protocol:
    """How one endpoint is spoken upstream: its path, where its usage is, how its stream is framed."""

    path: str  # appended to the provider's base_url
    usage: Callable[[Any], Usage | None]  # a whole answer's `usage` -> tokens
    streams: bool = True  # False: never sent `stream`
    # OpenAI chunks (`data:` only): `stream_options.include_usage` asked, its usage-only chunk, `[DONE]` last.
    chunks: bool = False
    anthropic: bool = False  # Anthropic's own API: on `kind: anthropic`, its auth headers instead of Bearer
    # Typed streams (`event:` + `data:` events, named by the `event:` line or the data's `type`):
    last: frozenset[str] = frozenset()  # the events that end the stream
    preamble: frozenset[str] = frozenset()  # held back until the first content: an error after them is retried
    stream_usage: StreamUsage | None = None  # applied to the `usage_events`
    usage_events: frozenset[str] = frozenset()
    content: str = ""  # events whose name ends so are content: a cut stream's completion estimate

    @property
    def end(self) -> str:
        return "[DONE]" if self.chunks else " or ".join(sorted(self.last))


_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
PROTOCOLS: dict[Endpoint, Protocol] = {
    "chat": Protocol("/chat/completions", _openai_usage, chunks=True),
    "completion": Protocol("/completions", _openai_usage, chunks=True),
    "embeddings": Protocol("/embeddings", _openai_usage, streams=False),
    "responses": Protocol(
        "/responses", _io_usage, last=_RESPONSES_END, stream_usage=_responses_stream_usage,
        usage_events=_RESPONSES_END, content=".delta",
        preamble=frozenset({"response.created", "response.in_progress", "response.output_item.added",
                            "response.content_part.added"}),
    ),
    "messages": Protocol(
        "/messages", _io_usage, anthropic=True, last=frozenset({"message_stop"}),
        stream_usage=_messages_stream_usage, usage_events=frozenset({"message_start", "message_delta"}),
        content="content_block_delta", preamble=frozenset({"message_start", "ping", "content_block_start"}),
    ),
    "count_tokens": Protocol("/messages/count_tokens", lambda _: Usage(), streams=False, anthropic=True),  # free
}


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
        key = env[provider.api_key_env] if provider.api_key_env and not self.key_missing else None
        bearer = {"authorization": f"Bearer {key}"} if key else {}
        native = {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": key} if key else {})}
        # Per request, not on the client: an endpoint's auth replaces the other's, it does not add to it.
        self.headers: dict[Endpoint, dict[str, str]] = {
            endpoint: {**_JSON, **(native if proto.anthropic and provider.kind == "anthropic" else bearer)}
            for endpoint, proto in PROTOCOLS.items()
        }
        headers = {"user-agent": "tierserve", "accept": "application/json, text/event-stream"}
        p = provider
        # read: the longest silence between bytes; the total deadline is ours (see start()).
        timeout = httpx.Timeout(connect=p.timeout_connect_s, read=p.timeout_read_s, write=p.timeout_read_s, pool=5)
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- the call -----------------------------------------------------------------------------------

    def refusal(self, endpoint: Endpoint, tier: str) -> str | None:
        """Why this provider can't be asked `endpoint` for `tier` (None: it can)."""
        if endpoint not in self.provider.endpoints:
            served = ", ".join(self.provider.endpoints) or "none"
            return f"provider {self.provider.name} does not serve the {endpoint} endpoint (it serves: {served})"
        if self.provider.upstream_model(tier) is None:
            return f"provider {self.provider.name} does not serve tier {tier}"
        return None

    async def start(
        self, endpoint: Endpoint, body: Mapping[str, Any], *, tier: str, stream: bool, prompt_tokens: int = 0
    ) -> Completed | Streaming:
        """Send `body` (the client's request) to this provider on behalf of `tier`.

        `prompt_tokens` (the router's estimate) is what a stream cut before its usage is charged for.
        Raises UpstreamError when no answer could be started (breaker open, key missing, retries spent).
        """
        name = self.provider.name
        proto = PROTOCOLS[endpoint]
        if (why := self.refusal(endpoint, tier)) is not None:
            raise UpstreamError(503, why, attempts=0)
        if stream and not proto.streams:
            raise UpstreamError(400, f"the {endpoint} endpoint does not stream", attempts=0)
        if self.key_missing:
            self._report(tier, endpoint, stream, "failed", 0, None, None, f"{self.provider.api_key_env} is not set")
            raise UpstreamError(503, f"provider {name}: ${self.provider.api_key_env} is not set", attempts=0)
        if self.breaker is not None and not self.breaker.acquire():
            retry = self.breaker.retry_in_s()
            raise UpstreamError(503, f"provider {name}: breaker open", attempts=0, retry_after_s=retry)
        payload = {**body, "model": self.provider.upstream_model(tier)}
        if proto.streams:
            payload["stream"] = stream
        else:  # embeddings, count_tokens: strict upstreams (OpenAI) reject arguments they don't take
            payload.pop("stream", None)
            payload.pop("stream_options", None)
        client_usage = True  # nothing asked on the client's behalf, so nothing to hide from it
        if proto.chunks and not stream:
            payload.pop("stream_options", None)  # vLLM answers 400 to stream_options without stream
        elif proto.chunks and self.provider.stream_usage:
            payload, client_usage = with_usage(payload)
        url = self.base_url + proto.path
        headers = self.headers[endpoint]
        started = self.clock()
        deadline = started + self.provider.timeout_total_s
        attempts = 0
        last: _Retry | None = None
        try:
            while True:
                attempts += 1
                try:
                    if stream:
                        events = await self._open_stream(url, payload, headers, deadline)
                        head = await self._head(events, proto, deadline)
                    else:
                        response = await self._post(url, payload, headers, deadline)
                        return self._completed(response, proto, tier, endpoint, attempts, started)
                except _Retry as exc:
                    last = exc
                else:
                    async def abandon(events: _Events = events, n: int = attempts) -> None:
                        await events.close()
                        cut = Usage(prompt_tokens, 0, estimated=True)
                        self._report(tier, endpoint, True, "cancelled", n, None, cut, None)

                    streaming = Streaming(attempts, abandon)
                    streaming.events = self._relay(
                        events, head, proto, tier, endpoint, attempts, started, prompt_tokens, client_usage, streaming
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

    async def _post(
        self, url: str, payload: dict[str, Any], headers: dict[str, str], deadline: float
    ) -> httpx.Response:
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                response = await self.http.post(url, content=orjson.dumps(payload), headers=headers)
        except TimeoutError:
            raise _Retry(504, f"no answer within timeout_total_s {self.provider.timeout_total_s:g}s") from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from None
        _check_status(response.status_code, response.content, response.headers)
        return response

    def _completed(
        self, response: httpx.Response, proto: Protocol, tier: str, endpoint: str, attempts: int, started: float
    ) -> Completed:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise _Retry(502, "upstream sent a 200 that is not JSON") from None
        usage = proto.usage(data.get("usage") if isinstance(data, dict) else None)
        self._report(tier, endpoint, False, "ok", attempts, self.clock() - started, usage, None)
        return Completed(200, response.content, usage, attempts)

    # -- streamed -------------------------------------------------------------------------------------

    async def _open_stream(
        self, url: str, payload: dict[str, Any], headers: dict[str, str], deadline: float
    ) -> _Events:
        request = self.http.build_request("POST", url, content=orjson.dumps(payload), headers=headers)
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

    async def _head(self, events: _Events, proto: Protocol, deadline: float) -> list[bytes]:
        """The stream's first event, after the preamble events before it: all of them, or _Retry."""
        head: list[bytes] = []
        try:
            async with asyncio.timeout(max(0.0, deadline - self.clock())):
                while True:
                    event = await events.next()
                    if event is None:
                        raise _Retry(502, "upstream ended the stream before its first event")
                    name = _typed(event)[0] if not proto.chunks else None
                    if is_error_event(event) or name == "error":
                        raise _Retry(502, f"upstream error event before the first token: {_error_message(event)}")
                    head.append(event)
                    if name not in proto.preamble:
                        return head
        except TimeoutError:
            await events.close()
            raise _Retry(504, f"no first event within timeout_total_s {self.provider.timeout_total_s:g}s") from None
        except httpx.HTTPError as exc:
            await events.close()
            raise _transport_error(exc) from None
        except _Retry:
            await events.close()
            raise

    async def _relay(
        self,
        events: _Events,
        head: list[bytes],
        proto: Protocol,
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
        pending = list(head)
        event: bytes | None = pending.pop(0)
        try:
            while event is not None:
                seen, usage = _inspect(proto, event, usage)
                if seen == "error":
                    error = f"upstream error event mid-stream: {_error_message(event)}"
                    break
                if seen == "content":
                    chunks += 1
                if seen != "usage_only" or client_usage:  # else: asked for accounting only
                    yield event
                if seen == "last":
                    break
                event = pending.pop(0) if pending else await events.next()
            else:
                error = f"upstream ended the stream without {proto.end}"
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
            if usage is None or usage.estimated:  # none, or the input tokens only (Anthropic's message_start)
                known = usage.prompt_tokens if usage else prompt_tokens
                usage = Usage(known, max(chunks, usage.completion_tokens if usage else 0), estimated=True)
            into.usage = usage
            self._report(tier, endpoint, True, result, attempts, ttfb, usage, error)
        if error is not None:
            yield render_sse(APIError(502, f"provider {self.provider.name}: {error}", code="upstream_stream_error"),
                             protocol_of(endpoint))

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
    """SSE events (each ending in a blank line, whatever its lines: `data:`, `event:` + `data:`) out of an httpx
    streaming response, however the network split them; each is returned whole, as sent (CRLF made LF)."""

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
            if self.buffer.endswith(b"\r"):  # a CRLF split between two reads
                data = self.buffer[-1:] + data
                self.buffer = self.buffer[:-1]
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
        if "context length" in lowered or "maximum context" in lowered or "prompt is too long" in lowered:
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


def _data(event: bytes) -> bytes:
    """The data of one SSE event (its `data:` lines joined)."""
    if event.startswith(b"data: "):  # the common case: one line
        return event[6:]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else event


def _typed(event: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """A typed event's name (its `event:` line, or else its data's `type`) and its data when that was parsed."""
    if event.startswith(b"event:"):
        start = 0
    elif (start := event.find(b"\nevent:") + 1) == 0:
        data = _json(_data(event))
        kind = data.get("type") if data else None
        return (kind if isinstance(kind, str) else None), data
    end = event.find(b"\n", start)
    return event[start + 6 : end if end >= 0 else None].strip().decode(errors="replace"), None


Seen = Literal["content", "usage_only", "last", "error", "other"]


def _inspect(proto: Protocol, event: bytes, usage: Usage | None) -> tuple[Seen, Usage | None]:
    """What one upstream event is to the relay, and the usage so far once it is counted."""
    if proto.chunks:
        if is_done(event):
            return "last", usage
        if is_error_event(event):
            return "error", usage
        if b'"usage":{' not in event and b'"usage": {' not in event:
            return "content", usage
        parsed = _json(_data(event))
        found = _openai_usage(parsed.get("usage")) if parsed else None
        # The chunk answering stream_options.include_usage has no choices; usage on a content chunk is vLLM's.
        return ("usage_only" if found and parsed and not parsed.get("choices") else "other"), found or usage
    name, data = _typed(event)
    if name == "error" or is_error_event(event):
        return "error", usage
    if name is None:
        return "other", usage
    if name in proto.usage_events and proto.stream_usage is not None:
        data = data if data is not None else _json(_data(event))
        usage = (proto.stream_usage(usage, name, data) if data else None) or usage
    if name in proto.last:
        return "last", usage
    return ("content" if proto.content and name.endswith(proto.content) else "other"), usage


def _error_message(data: bytes) -> str:
    """The message of an error body or event: OpenAI's and Anthropic's `error.message`, the Responses API's
    error event's `message`."""
    data = _data(data).strip()
    parsed = _json(data)
    error = parsed.get("error") if parsed else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")[:300]
    if isinstance(error, str):
        return error[:300]
    if parsed and isinstance(message := parsed.get("message"), str):
        return message[:300]
    return data[:200].decode(errors="replace")
