"""The dispatcher with in-memory backends: candidates in order, fail-over only before the first byte, the
first-chunk peek, mid-stream failures, timeouts, and exactly one accounting record per request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from serving.gateway.dispatch import Answer, Dispatcher, Request
from serving.gateway.router import Candidate, Decision
from serving.security.keys import KeySpec
from serving.wire.errors import APIError
from serving.wire.items import Result, Usage
from serving.wire.sse import DONE
from tests.support.gateway import HANG, FakeBackend, Parts, gateway_parts

CHAT = Request("chat", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, stream=False)
STREAM = Request("chat", {**CHAT.body, "stream": True}, stream=True)
TIER = Candidate("tier", "fast", "fast", "model:fast")
PEER = Candidate("provider", "peer", "fast", "model:fast->provider:peer")
BOTH = Decision("tier", "fast", "model:fast", (TIER, PEER))


def ok(text: str = "hello", usage: Usage | None = None) -> Result:
    return Result(200, orjson.dumps({"text": text}), usage or Usage(3, 2))


def down(status: int = 503) -> Result:
    return Result.error(APIError(status, f"engine is dead ({status})"))


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return gateway_parts(tmp_path)


def setup(
    parts: Parts, tier: FakeBackend, peer: FakeBackend | None = None
) -> tuple[Dispatcher, list[tuple[str, bool]]]:
    seen: list[tuple[str, bool]] = []
    dispatcher = Dispatcher(parts.config, {"fast": tier}, peer,
                            attempted=lambda c, failed: seen.append((c.name, failed)))
    return dispatcher, seen


def ticket(parts: Parts, agent: str = "bot"):  # type: ignore[no-untyped-def]
    _, key = parts.keys.create(KeySpec(agent=agent))
    return parts.accounting.open(key, "fast", "chat"), key


async def collect(answer: Answer) -> list[bytes]:
    assert answer.chunks is not None
    return [chunk async for chunk in answer.chunks]


def test_the_first_candidate_that_answers_serves_and_is_accounted_once(parts: Parts) -> None:
    tier, peer = FakeBackend([down()]), FakeBackend([ok("from peer", Usage(4, 6, cost_usd=0.25))])
    dispatcher, seen = setup(parts, tier, peer)
    t, key = ticket(parts)
    answer = asyncio.run(dispatcher.dispatch(BOTH, CHAT, t))
    assert answer.result is not None and orjson.loads(answer.result.body) == {"text": "from peer"}
    assert answer.headers["x-tierserve-provider"] == "peer" and answer.headers["x-tierserve-tier"] == "fast"
    assert answer.headers["x-tierserve-route-reason"].startswith("fallback after tier fast failed (503: engine is dead")
    assert seen == [("fast", True), ("peer", False)]
    assert [c.target for c in tier.calls + peer.calls] == ["", "peer"] and peer.calls[0].tier == "fast"
    assert parts.sample("tierserve_fallbacks_total", tier="fast", reason="unavailable") == 1
    assert parts.sample("tierserve_requests_total", tier="fast", provider="peer", endpoint="chat", status="200") == 1
    usage = parts.limiter.usage(key)
    assert (usage["day"]["requests"], usage["day"]["completion_tokens"], usage["day"]["cost_usd"]) == (1, 6, 0.25)
    assert parts.sample("tierserve_agent_cost_usd_total", agent="bot") == 0.25
    t.finish(500)  # a second finish changes nothing
    assert parts.limiter.usage(key)["day"]["requests"] == 1


def test_a_client_error_is_the_answer_and_never_fails_over(parts: Parts) -> None:
    bad = Result.error(APIError(400, "messages: bad", param="messages"))
    tier, peer = FakeBackend([bad]), FakeBackend([ok()])
    dispatcher, _ = setup(parts, tier, peer)
    answer = asyncio.run(dispatcher.dispatch(BOTH, CHAT, ticket(parts)[0]))
    assert answer.result is not None and answer.result.status == 400 and not peer.calls


def test_every_candidate_failing_is_the_last_error_with_its_retry_after(parts: Parts) -> None:
    limited = Result.error(APIError(429, "budget spent", headers={"retry-after": "42"}), failover=True)
    dispatcher, _ = setup(parts, FakeBackend([down()]), FakeBackend([limited]))
    with pytest.raises(APIError) as err:
        asyncio.run(dispatcher.dispatch(BOTH, CHAT, ticket(parts)[0]))
    assert err.value.status == 429 and err.value.headers == {"retry-after": "42"}
    assert "tier fast failed (503" in err.value.message
    assert "provider peer failed (429: budget spent)" in err.value.message
    assert parts.sample("tierserve_requests_total", tier="fast", provider="peer", endpoint="chat", status="429") == 1


def test_a_backend_that_does_not_answer_in_time_is_a_503_timeout(parts: Parts) -> None:
    slow = Candidate("tier", "fast", "fast", "model:fast", max_wait_s=0.05)
    dispatcher, _ = setup(parts, FakeBackend([HANG]))
    with pytest.raises(APIError) as err:
        asyncio.run(dispatcher.dispatch(Decision("tier", "fast", "r", (slow,)), CHAT, ticket(parts)[0]))
    assert err.value.status == 503 and "did not answer within 0.05s" in err.value.message
    assert err.value.headers["retry-after"] == str(parts.config.routing.unavailable_retry_after_s)


def test_transport_trouble_before_the_answer_fails_over(parts: Parts) -> None:
    dispatcher, _ = setup(parts, FakeBackend([ConnectionError("grpc down")]), FakeBackend([ok()]))
    answer = asyncio.run(dispatcher.dispatch(BOTH, CHAT, ticket(parts)[0]))
    assert answer.headers["x-tierserve-provider"] == "peer"


def test_a_stream_is_peeked_and_fails_over_before_its_first_byte(parts: Parts) -> None:
    tier = FakeBackend([[down()]])  # the engine's error arrives as the stream's first item
    peer = FakeBackend([[b"data: 1\n\n", b"data: 2\n\n", Usage(5, 2, cost_usd=0.5), DONE]])
    dispatcher, seen = setup(parts, tier, peer)
    t, key = ticket(parts)

    async def run() -> list[bytes]:
        return await collect(await dispatcher.dispatch(BOTH, STREAM, t))

    assert asyncio.run(run()) == [b"data: 1\n\n", b"data: 2\n\n", DONE]  # the Usage item is not sent
    assert seen == [("fast", True), ("peer", False)] and peer.cancelled == 0
    assert parts.limiter.usage(key)["day"]["completion_tokens"] == 2
    assert parts.sample("tierserve_requests_total", tier="fast", provider="peer", endpoint="chat", status="200") == 1


def test_a_stream_that_fails_after_its_first_byte_ends_with_an_error_event_and_is_not_retried(parts: Parts) -> None:
    """The backend's stream raises after the first byte (a replica that died cannot report in-stream itself):
    the client gets the protocol's error event as the stream's last event, never a cut connection, and nothing
    goes to another candidate."""
    tier = FakeBackend([[b"data: 1\n\n", RuntimeError("connection to the replica lost")]])
    peer = FakeBackend([[b"data: never\n\n"]])
    dispatcher, _ = setup(parts, tier, peer)
    t, _key = ticket(parts)

    async def run() -> list[bytes]:
        return await collect(await dispatcher.dispatch(BOTH, STREAM, t))

    chunks = asyncio.run(run())
    assert chunks[0] == b"data: 1\n\n" and len(chunks) == 2
    error = orjson.loads(chunks[1].removeprefix(b"data: "))["error"]
    assert error["code"] == "stream_error" and "tier fast failed mid-stream: RuntimeError" in error["message"]
    assert not peer.calls and tier.cancelled == 1  # the engine request is aborted, nothing sent elsewhere
    assert parts.sample("tierserve_requests_total", tier="fast", provider="local", endpoint="chat",
                        status="stream_error") == 1


def test_a_replica_dying_mid_stream_is_an_error_event_in_the_protocol_and_counts_towards_ejection(
    parts: Parts,
) -> None:
    from ray.exceptions import ActorDiedError

    from serving.gateway.ejection import Ejector

    ejector = Ejector(["fast"], threshold=1)
    tier = FakeBackend([[b"event: message_start\ndata: {}\n\n", ActorDiedError()]])
    dispatcher = Dispatcher(parts.config, {"fast": tier}, None, ejector=ejector)
    messages = Request("messages", {"model": "fast", "messages": [{"role": "user", "content": "hi"}],
                                    "max_tokens": 4, "stream": True}, stream=True)
    t, _key = ticket(parts)

    async def run() -> list[bytes]:
        return await collect(await dispatcher.dispatch(Decision("tier", "fast", "r", (TIER,)), messages, t))

    chunks = asyncio.run(run())
    assert chunks[-1].startswith(b"event: error\ndata: ")
    event = orjson.loads(chunks[-1].split(b"data: ", 1)[1])
    assert event["type"] == "error" and "failed mid-stream: ActorDiedError" in event["error"]["message"]
    assert ejector.reason("fast") == "replica died"


def test_a_stream_whose_first_chunk_never_comes_is_cancelled_and_fails_over(parts: Parts) -> None:
    slow = Candidate("tier", "fast", "fast", "model:fast", max_wait_s=0.05)
    tier, peer = FakeBackend([[HANG]]), FakeBackend([[b"data: x\n\n", Usage(1, 1), DONE]])
    dispatcher, _ = setup(parts, tier, peer)

    async def run() -> list[bytes]:
        return await collect(await dispatcher.dispatch(Decision("tier", "fast", "r", (slow, PEER)), STREAM,
                                                       ticket(parts)[0]))

    assert asyncio.run(run()) == [b"data: x\n\n", DONE] and tier.cancelled == 1


def test_a_client_that_hangs_up_mid_stream_cancels_the_backend_and_is_a_499(parts: Parts) -> None:
    tier = FakeBackend([[b"data: 1\n\n", HANG]])
    dispatcher, _ = setup(parts, tier)

    async def run() -> None:
        answer = await dispatcher.dispatch(Decision("tier", "fast", "r", (TIER,)), STREAM, ticket(parts)[0])
        assert answer.chunks is not None
        reader = asyncio.ensure_future(collect(answer))
        await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(run())
    assert tier.cancelled == 1
    assert parts.sample("tierserve_requests_total", tier="fast", provider="local", endpoint="chat", status="499") == 1


def test_a_client_gone_while_a_chunk_is_being_sent_still_cancels_the_backend_at_once(parts: Parts) -> None:
    # The HTTP response is cancelled inside `send`, with the relay suspended at its yield (not awaiting the
    # backend): the response must close the relay itself rather than leave that to the garbage collector.
    from serving.api.streaming import SSEResponse

    tier = FakeBackend([[b"data: 1\n\n", b"data: 2\n\n", HANG]])
    dispatcher, _ = setup(parts, tier)
    sent: list[bytes] = []
    stalled = asyncio.Event()

    async def receive() -> dict[str, str]:
        await asyncio.Event().wait()
        return {}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])  # type: ignore[arg-type]
            if len(sent) == 2:
                stalled.set()
                await asyncio.Event().wait()  # the client stops reading

    async def run() -> None:
        answer = await dispatcher.dispatch(Decision("tier", "fast", "r", (TIER,)), STREAM, ticket(parts)[0])
        assert answer.chunks is not None
        response = SSEResponse(answer.chunks, answer.headers)
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        task = asyncio.ensure_future(response(scope, receive, send))  # type: ignore[arg-type]
        await stalled.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert tier.cancelled == 1  # before any collection could have run

    asyncio.run(run())
    assert sent == [b"data: 1\n\n", b"data: 2\n\n"]
    assert parts.sample("tierserve_requests_total", tier="fast", provider="local", endpoint="chat", status="499") == 1


def test_cold_tiers_wait_at_most_their_overflow_policy(parts: Parts) -> None:
    from tests.support.gateway import gateway_config

    config = gateway_config(tiers={
        "fast": {"served_name": "f", "model": {"tiny_seed": 1}, "replicas": {"min": 0, "max": 1},
                 "overflow": {"max_cold_wait_s": 7}},
    })
    dispatcher = Dispatcher(config, {}, None)
    assert dispatcher.wait_limit_s(Candidate("tier", "fast", "fast", "r")) == 7
    assert dispatcher.wait_limit_s(Candidate("tier", "fast", "fast", "r", max_wait_s=2)) == 2
    assert dispatcher.wait_limit_s(PEER) == config.ingress.request_timeout_s
