"""The provider client on every endpoint's own protocol, against an in-process fake upstream (httpx MockTransport).

tests/unit/test_providers.py runs the fault matrix over real sockets on chat and completion; this file covers
what differs per endpoint: paths, auth headers, usage and cost, typed SSE events (`event:` + `data:`) split
anywhere by the network, Anthropic's error shapes, and the fallback deployment passing endpoints through.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from serving.backends import fallback
from serving.backends.breaker import Breaker
from serving.backends.providers import PROTOCOLS, Completed, Outcome, ProviderClient, Streaming, UpstreamError
from serving.config import AppConfig, Endpoint, ModelSource, Provider, Tier
from serving.spend.ledger import Budget
from serving.wire.items import Call, Result, Usage

T = TypeVar("T")
KEY = "secret-123"
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per 1M tokens


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sse(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


def split(data: bytes, size: int) -> list[bytes]:
    """`data` cut every `size` bytes, across event and line boundaries alike."""
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- upstream answers, in each protocol ----------------------------------------------------------------

BODIES: dict[Endpoint, dict[str, Any]] = {
    "chat": {"id": "c", "choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 11,
                                                                              "completion_tokens": 4}},
    "completion": {"id": "c", "choices": [{"text": "hi"}], "usage": {"prompt_tokens": 11, "completion_tokens": 4}},
    "responses": {"id": "r", "output": [], "usage": {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}},
    "messages": {"id": "m", "type": "message", "content": [], "usage": {"input_tokens": 11, "output_tokens": 4}},
    "embeddings": {"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 11, "total_tokens": 11}},
    "count_tokens": {"input_tokens": 11},
}
REQUESTS: dict[Endpoint, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "hi"}]},
    "completion": {"prompt": "hi"},
    "responses": {"input": "hi"},
    "messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    "embeddings": {"input": "hi"},
    "count_tokens": {"messages": [{"role": "user", "content": "hi"}]},
}
EXPECTED_USAGE: dict[Endpoint, tuple[int, int]] = {
    "chat": (11, 4), "completion": (11, 4), "responses": (11, 4), "messages": (11, 4), "embeddings": (11, 0),
    "count_tokens": (0, 0),
}


def responses_events(*, named: bool = True) -> list[bytes]:
    """A Responses API stream: created, two text deltas, completed with usage."""
    response = {"id": "r", "status": "in_progress", "output": []}
    events = [
        ("response.created", {"type": "response.created", "response": response, "sequence_number": 0}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hel", "sequence_number": 1}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "lo", "sequence_number": 2}),
        ("response.completed", {"type": "response.completed", "sequence_number": 3, "response": {
            **response, "status": "completed", "usage": {"input_tokens": 13, "output_tokens": 2, "total_tokens": 15}}}),
    ]
    return [sse(name if named else None, data) for name, data in events]


def responses_stream(*, named: bool = True) -> bytes:
    return b"".join(responses_events(named=named))


def messages_events(*, end: bool = True, error_after: int | None = None) -> list[bytes]:
    """An Anthropic Messages stream: input tokens in message_start, cumulative output in message_delta."""
    message = {"id": "m", "type": "message", "role": "assistant", "content": [], "usage": {"input_tokens": 13,
                                                                                           "output_tokens": 1}}
    events = [
        sse("message_start", {"type": "message_start", "message": message}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "Hel"}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "lo"}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                              "usage": {"output_tokens": 5}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    if error_after is not None:
        events = [*events[:error_after], ANTHROPIC_ERROR_EVENT]
    return events if end else events[:-2]


ANTHROPIC_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
ANTHROPIC_ERROR_EVENT = sse("error", ANTHROPIC_ERROR)
RESPONSES_ERROR_EVENT = sse("error", {"type": "error", "code": "server_error", "message": "model crashed",
                                      "param": None, "sequence_number": 0})


# -- the fake upstream and the harness -----------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    json: Any = None  # a whole answer
    chunks: list[bytes] | None = None  # a stream, as the network delivers it
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: httpx.Headers
    body: dict[str, Any]


class Upstream:
    """Answers requests from a script, in order (the last answer repeats); records what it received."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.seen: list[Seen] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(request.url.path, request.headers, json.loads(request.content)))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer.chunks is None:
            return httpx.Response(answer.status, json=answer.json, headers=answer.headers)
        chunks = answer.chunks

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                await asyncio.sleep(0)
                yield chunk

        return httpx.Response(answer.status, content=body(), headers={"content-type": "text/event-stream"})


class Harness:
    def __init__(self, tmp_path: Path, upstream: Upstream, **provider: Any) -> None:
        fields = {"name": "up", "kind": "vllm", "base_url": "http://upstream.test/v1", "api_key_env": "UP_KEY",
                  "models": {"coder": "up-model"}, "price_input_per_1m_usd": PRICE_IN,
                  "price_output_per_1m_usd": PRICE_OUT, "retries": 2, **provider}
        self.provider = Provider.model_validate(fields)
        self.upstream = upstream
        self.breaker = Breaker("provider:up", failures=3, cooldown_s=60)
        self.budget = Budget(tmp_path / "spend.db", [self.provider], cache_s=0)
        self.outcomes: list[Outcome] = []
        self.sleeps: list[float] = []

    async def _sleep(self, s: float) -> None:
        self.sleeps.append(s)

    def client(self) -> ProviderClient:
        return ProviderClient(self.provider, breaker=self.breaker, budget=self.budget, on_outcome=self.outcomes.append,
                              env={"UP_KEY": KEY}, sleep=self._sleep, rand=lambda: 0.5,
                              transport=self.upstream.transport())

    async def call(self, endpoint: Endpoint, *, stream: bool, **body: Any) -> tuple[Completed | Streaming, bytes]:
        client = self.client()
        try:
            answer = await client.start(endpoint, {"model": "coder", **REQUESTS[endpoint], **body}, tier="coder",
                                        stream=stream, prompt_tokens=3)
            out = b"".join([c async for c in answer]) if isinstance(answer, Streaming) else b""
            return answer, out
        finally:
            await client.aclose()

    def spent(self) -> tuple[int, int, int, int, float]:
        t = self.budget.totals("provider", "up", "day")
        return t.requests, t.estimated, t.prompt_tokens, t.completion_tokens, t.cost_usd


def cost(prompt: int, completion: int) -> float:
    return (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6


# -- non-streamed: every endpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(PROTOCOLS))
def test_non_streamed_every_endpoint(tmp_path: Path, endpoint: Endpoint) -> None:
    up = Upstream(Answer(json=BODIES[endpoint]))
    h = Harness(tmp_path, up)
    extra = {"stream_options": {"include_usage": True}} if PROTOCOLS[endpoint].chunks else {}  # vLLM: 400
    answer, _ = run(h.call(endpoint, stream=False, **extra))
    assert isinstance(answer, Completed) and answer.status == 200
    assert json.loads(answer.body) == BODIES[endpoint]  # passed through
    prompt, completion = EXPECTED_USAGE[endpoint]
    assert answer.usage == Usage(prompt, completion)
    assert h.spent() == (1, 0, prompt, completion, pytest.approx(cost(prompt, completion)))
    seen = up.seen[-1]
    assert seen.path == "/v1" + PROTOCOLS[endpoint].path and seen.body["model"] == "up-model"
    assert "stream_options" not in seen.body
    if endpoint in ("embeddings", "count_tokens"):
        assert "stream" not in seen.body  # strict upstreams reject arguments an endpoint doesn't take
    else:
        assert seen.body["stream"] is False
    assert h.outcomes[-1].result == "ok" and h.outcomes[-1].endpoint == endpoint


def test_count_tokens_is_free_and_passed_through(tmp_path: Path) -> None:
    h = Harness(tmp_path, Upstream(Answer(json={"input_tokens": 4242})), kind="anthropic")
    answer, _ = run(h.call("count_tokens", stream=False))
    assert isinstance(answer, Completed) and json.loads(answer.body) == {"input_tokens": 4242}
    assert answer.usage == Usage() and h.spent() == (1, 0, 0, 0, 0.0)


def test_non_streaming_endpoints_refuse_a_stream(tmp_path: Path) -> None:
    up = Upstream(Answer(json=BODIES["embeddings"]))
    with pytest.raises(UpstreamError, match="does not stream"):
        run(Harness(tmp_path, up).call("embeddings", stream=True))
    assert up.seen == []


def test_an_endpoint_the_provider_does_not_list_is_refused_before_contact(tmp_path: Path) -> None:
    up = Upstream(Answer(json=BODIES["responses"]))
    h = Harness(tmp_path, up, kind="gradient")  # chat and completion only
    with pytest.raises(UpstreamError, match="does not serve the responses endpoint") as info:
        run(h.call("responses", stream=False))
    assert info.value.status == 503 and up.seen == [] and h.outcomes == []


# -- auth headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "endpoint", "native"),
    [("anthropic", "messages", True), ("anthropic", "count_tokens", True), ("anthropic", "chat", False),
     ("vllm", "messages", False), ("tierserve", "count_tokens", False), ("openai", "responses", False)],
)
def test_auth_headers(tmp_path: Path, kind: str, endpoint: Endpoint, native: bool) -> None:
    up = Upstream(Answer(json=BODIES[endpoint]))
    run(Harness(tmp_path, up, kind=kind, endpoints=[endpoint]).call(endpoint, stream=False))
    headers = up.seen[-1].headers
    if native:  # Anthropic's own API: its key header and version, no Bearer
        assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
        assert "authorization" not in headers
    else:
        assert headers["authorization"] == f"Bearer {KEY}" and "x-api-key" not in headers


# -- streamed: Responses and Messages events ------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
def test_responses_stream_split_anywhere(tmp_path: Path, size: int) -> None:
    raw = responses_stream()
    up = Upstream(Answer(chunks=split(raw, size)))
    h = Harness(tmp_path, up)
    answer, out = run(h.call("responses", stream=True))
    assert isinstance(answer, Streaming) and out == raw  # every event forwarded whole and unchanged
    assert answer.usage == Usage(13, 2) and h.spent() == (1, 0, 13, 2, pytest.approx(cost(13, 2)))
    sent = up.seen[-1].body
    assert up.seen[-1].path == "/v1/responses" and sent["stream"] is True and "stream_options" not in sent
    assert h.outcomes[-1].result == "ok" and h.breaker.successes == 1


def test_responses_stream_of_data_only_events(tmp_path: Path) -> None:
    raw = responses_stream(named=False)  # no `event:` lines: the data's `type` names them
    h = Harness(tmp_path, Upstream(Answer(chunks=split(raw, 5))))
    answer, out = run(h.call("responses", stream=True))
    assert out == raw and answer.usage == Usage(13, 2) and h.outcomes[-1].result == "ok"


@pytest.mark.parametrize("size", [1, 9, 100_000])
def test_messages_stream_split_anywhere(tmp_path: Path, size: int) -> None:
    raw = b"".join(messages_events())
    up = Upstream(Answer(chunks=split(raw, size)))
    h = Harness(tmp_path, up, kind="anthropic")
    answer, out = run(h.call("messages", stream=True))
    assert isinstance(answer, Streaming) and out == raw
    # input from message_start, output from the last message_delta (cumulative)
    assert answer.usage == Usage(13, 5) and h.spent() == (1, 0, 13, 5, pytest.approx(cost(13, 5)))
    sent = up.seen[-1].body
    assert up.seen[-1].path == "/v1/messages" and sent["stream"] is True and "stream_options" not in sent
    assert sent["model"] == "up-model" and h.outcomes[-1].result == "ok"


def test_crlf_events_split_between_cr_and_lf(tmp_path: Path) -> None:
    raw = b"".join(messages_events())
    crlf = raw.replace(b"\n", b"\r\n")
    cut = crlf.index(b"\r\n\r\n") + 1  # between a CR and its LF
    h = Harness(tmp_path, Upstream(Answer(chunks=[crlf[:cut], crlf[cut:]])), kind="anthropic")
    answer, out = run(h.call("messages", stream=True))
    assert out == raw and answer.usage == Usage(13, 5)


def test_messages_stream_cut_before_message_delta_charges_input_and_an_estimate(tmp_path: Path) -> None:
    h = Harness(tmp_path, Upstream(Answer(chunks=messages_events(end=False))), kind="anthropic")
    answer, out = run(h.call("messages", stream=True))
    *forwarded, last = [e + b"\n\n" for e in out.split(b"\n\n") if e]
    assert forwarded == messages_events(end=False)
    assert last.startswith(b"event: error\ndata: ")  # our error, in Anthropic's shape
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "without message_stop" in error["error"]["message"]
    # the real input tokens (13, not the router's 3) and the content events seen
    assert answer.usage == Usage(13, 2, estimated=True) and h.spent()[:4] == (1, 1, 13, 2)
    assert h.outcomes[-1].result == "failed" and h.breaker.errors == 1


def test_chat_stream_is_unchanged_by_the_typed_framing(tmp_path: Path) -> None:
    chunk = {"choices": [{"delta": {"content": "hi"}}]}
    raw = (b"data: " + json.dumps(chunk).encode() + b"\n\n"
           + b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n' + b"data: [DONE]\n\n")
    up = Upstream(Answer(chunks=split(raw, 3)))
    h = Harness(tmp_path, up)
    answer, out = run(h.call("chat", stream=True))
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")  # the usage chunk was ours
    assert answer.usage == Usage(5, 1) and up.seen[-1].body["stream_options"] == {"include_usage": True}


# -- errors --------------------------------------------------------------------------------------------


def test_anthropic_client_error_becomes_our_envelope_with_its_status(tmp_path: Path) -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    up = Upstream(Answer(400, json=body))
    h = Harness(tmp_path, up, kind="anthropic")
    answer, _ = run(h.call("messages", stream=True))
    assert isinstance(answer, Completed) and answer.status == 400 and len(up.seen) == 1  # not retried
    error = json.loads(answer.body)["error"]
    assert error["message"] == "max_tokens: Field required" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert h.outcomes[-1].result == "client_error" and h.breaker.errors == 0


def test_anthropic_prompt_too_long_is_context_length_exceeded(tmp_path: Path) -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error",
                                       "message": "prompt is too long: 210000 tokens > 200000 maximum"}}
    h = Harness(tmp_path, Upstream(Answer(400, json=body)), kind="anthropic")
    answer, _ = run(h.call("messages", stream=False))
    assert isinstance(answer, Completed) and json.loads(answer.body)["error"]["code"] == "context_length_exceeded"


def test_anthropic_overloaded_is_retried_then_fails_over_with_its_message(tmp_path: Path) -> None:
    up = Upstream(Answer(529, json=ANTHROPIC_ERROR))
    h = Harness(tmp_path, up, kind="anthropic")
    with pytest.raises(UpstreamError) as info:
        run(h.call("messages", stream=False))
    assert info.value.status == 502 and len(up.seen) == 3 and "upstream 529: Overloaded" in info.value.message
    assert h.breaker.errors == 1 and h.outcomes[-1].result == "failed"


def test_anthropic_bad_key_is_not_retried_on_the_same_provider(tmp_path: Path) -> None:
    body = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    up = Upstream(Answer(401, json=body))
    with pytest.raises(UpstreamError, match="invalid x-api-key"):
        run(Harness(tmp_path, up, kind="anthropic").call("count_tokens", stream=False))
    assert len(up.seen) == 1


@pytest.mark.parametrize(
    ("endpoint", "first", "good"),
    [("messages", [ANTHROPIC_ERROR_EVENT], messages_events()),
     # after message_start and ping, still before any content: held back, so retried too
     ("messages", messages_events(error_after=3), messages_events()),
     ("responses", [RESPONSES_ERROR_EVENT], responses_events())],
)
def test_error_event_before_content_is_a_failure_before_the_first_byte(
    tmp_path: Path, endpoint: Endpoint, first: list[bytes], good: list[bytes]
) -> None:
    up = Upstream(Answer(chunks=first), Answer(chunks=good))
    h = Harness(tmp_path, up, kind="anthropic" if endpoint == "messages" else "openai")
    answer, out = run(h.call(endpoint, stream=True))
    assert isinstance(answer, Streaming) and answer.attempts == 2 and out == b"".join(good)
    assert h.sleeps == [0.125] and h.breaker.errors == 0 and h.breaker.successes == 1


def test_error_events_on_every_attempt_fail_over(tmp_path: Path) -> None:
    up = Upstream(Answer(chunks=split(ANTHROPIC_ERROR_EVENT, 4)))
    h = Harness(tmp_path, up, kind="anthropic")
    with pytest.raises(UpstreamError, match="error event before the first token: Overloaded") as info:
        run(h.call("messages", stream=True))
    assert info.value.status == 502 and len(up.seen) == 3 and h.breaker.errors == 1 and h.spent()[0] == 0


def test_error_event_mid_stream_ends_it_with_one_error_event(tmp_path: Path) -> None:
    events = messages_events(error_after=4)  # after the first content delta
    h = Harness(tmp_path, Upstream(Answer(chunks=events)), kind="anthropic")
    answer, out = run(h.call("messages", stream=True))
    assert answer.attempts == 1 and out.startswith(b"".join(events[:4]))
    error = json.loads(out[len(b"".join(events[:4])):].split(b"data: ", 1)[1])
    assert "mid-stream: Overloaded" in error["error"]["message"]
    assert h.breaker.errors == 1 and h.outcomes[-1].result == "failed"


def test_responses_error_event_mid_stream(tmp_path: Path) -> None:
    head = b"".join(responses_events()[:2])  # created, one delta
    h = Harness(tmp_path, Upstream(Answer(chunks=[head, RESPONSES_ERROR_EVENT])))
    answer, out = run(h.call("responses", stream=True))
    # Ended with the Responses API's own error event, which the OpenAI SDK raises on.
    event = out[len(head):]
    assert out.startswith(head) and event.startswith(b"event: error\ndata: ")
    assert json.loads(event[len(b"event: error\ndata: "):]) == {
        "type": "error", "code": "upstream_stream_error", "param": None,
        "message": json.loads(event[len(b"event: error\ndata: "):])["message"]}
    assert "model crashed" in out.decode() and answer.usage == Usage(3, 1, estimated=True)


# -- the fallback deployment ------------------------------------------------------------------------------


def test_fallback_passes_every_endpoint_through_and_refuses_unlisted_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fallback, "redact_replica_logs", lambda: None)  # global logging is not this test's
    monkeypatch.setenv("UP_KEY", KEY)
    tier = Tier(served_name="c", model=ModelSource(tiny_seed=1))
    providers = [
        {"name": "claude", "kind": "anthropic", "base_url": "http://upstream.test/v1", "api_key_env": "UP_KEY",
         "default_model": "claude-x", "price_input_per_1m_usd": PRICE_IN, "price_output_per_1m_usd": PRICE_OUT},
    ]
    config = AppConfig.model_validate({"tiers": {"coder": tier}, "providers": providers})
    server = fallback.FallbackServer(config, str(tmp_path / "state"))
    up = Upstream(Answer(chunks=messages_events()))
    server.clients["claude"] = ProviderClient(config.providers[0], budget=server.budget, transport=up.transport())

    async def stream(call: Call) -> list[Any]:
        return [item async for item in server.stream(call)]

    items = run(stream(Call("messages", REQUESTS["messages"], "coder", target="claude")))
    assert b"".join(i for i in items if isinstance(i, bytes)) == b"".join(messages_events())
    assert items[-1] == Usage(13, 5, cost_usd=cost(13, 5))  # priced as the budget prices it
    assert up.seen[-1].path == "/v1/messages" and up.seen[-1].headers["x-api-key"] == KEY

    refused = run(server.complete(Call("embeddings", REQUESTS["embeddings"], "coder", target="claude")))
    assert isinstance(refused, Result) and refused.status == 503 and refused.failover
    assert "does not serve the embeddings endpoint" in json.loads(refused.body)["error"]["message"]
    unknown = run(server.complete(Call("chat", REQUESTS["chat"], "coder", target="nobody")))
    assert unknown.status == 503 and unknown.failover and len(up.seen) == 1
