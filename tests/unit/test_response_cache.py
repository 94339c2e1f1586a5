"""The response cache (serving/gateway/response_cache.py) and its place after the dispatcher: which requests it
applies to, its bounds, what it keeps of an answer (a tier's whole answers only) and how a hit is replayed and
accounted. The ingress wiring is tested end to end in tests/e2e/test_response_cache_e2e.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.config import ConfigError, ResponseCacheConfig
from serving.gateway.dispatch import Answer, Dispatcher, Request
from serving.gateway.response_cache import ResponseCache, cache_directives, deterministic, entry_key
from serving.gateway.router import Candidate, Decision
from serving.security.keys import KeySpec
from serving.wire.items import Result, Usage
from serving.wire.sse import DONE
from tests.support.clock import Clock
from tests.support.gateway import HANG, FakeBackend, Parts, gateway_config, gateway_parts

TIER = Candidate("tier", "fast", "fast", "model:fast")
PEER = Candidate("provider", "peer", "fast", "model:fast->provider:peer")
BOTH = Decision("tier", "fast", "model:fast", (TIER, PEER))
GREEDY = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def cache(clock: Clock | None = None, **limits: Any) -> ResponseCache:
    return ResponseCache(ResponseCacheConfig(**limits), clock=clock or Clock())


def lookup(c: ResponseCache, body: dict[str, Any] = GREEDY, *, scope: str | None = "team-a",
           headers: dict[str, str] | None = None, endpoint: str = "chat", enabled: bool = True) -> Any:
    return c.lookup(enabled=enabled, endpoint=endpoint, body=body, scope=scope, tier="fast", headers=headers or {})


def chunk(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


# -- which requests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("over", "expected"), [
    ({"temperature": 0}, True), ({"temperature": 0.0}, True), ({"seed": 7, "temperature": 0.9}, True),
    ({}, False), ({"temperature": 0.7}, False), ({"temperature": False}, False), ({"seed": True}, False),
    ({"seed": "7"}, False),
])
def test_only_deterministic_bodies_are_cacheable(over: dict[str, Any], expected: bool) -> None:
    assert deterministic({"model": "fast", **over}) is expected


def test_the_cache_applies_to_opted_in_deterministic_generation_only() -> None:
    c = cache()
    assert lookup(c).result == "miss" and lookup(c).key is not None
    greedy_prompt = {"model": "fast", "prompt": "hi", "temperature": 0}
    assert lookup(c, greedy_prompt, endpoint="completion").result == "miss"  # the completions endpoint
    assert lookup(c, {**GREEDY, "max_tokens": 4}, endpoint="messages").result == "miss"
    assert lookup(c, enabled=False).result is None  # the tier or the key did not opt in
    assert lookup(c, {**GREEDY, "temperature": 1}).result is None
    assert lookup(c, endpoint="responses").result is None  # stateful: a replay would reuse a response id
    assert lookup(c, endpoint="embeddings").result is None


def test_cache_control_bypasses_it() -> None:
    c = cache()
    key = lookup(c).key
    c.put(key, body=b"{}")
    assert lookup(c).result == "hit"
    no_cache = lookup(c, headers={"cache-control": "No-Cache"})
    assert (no_cache.result, no_cache.key, no_cache.hit) == ("bypass", key, None)  # answered fresh, then kept
    no_store = lookup(c, headers={"cache-control": "max-age=0, no-store"})
    assert (no_store.result, no_store.key) == ("bypass", None)  # not kept either
    assert cache_directives({"cache-control": "no-cache, max-age=0"}) == {"no-cache", "max-age"}


def test_entries_are_per_scope_tier_endpoint_and_body() -> None:
    base = entry_key("team-a", "fast", "chat", GREEDY)
    assert base == entry_key("team-a", "fast", "chat", dict(reversed(list(GREEDY.items()))))  # key order is not
    others = [entry_key("team-b", "fast", "chat", GREEDY), entry_key(None, "fast", "chat", GREEDY),
              entry_key("team-a", "coder", "chat", GREEDY), entry_key("team-a", "fast", "messages", GREEDY),
              entry_key("team-a", "fast", "chat", {**GREEDY, "stream": True})]
    assert len({base, *others}) == 6
    c = cache()
    c.put(lookup(c).key, body=b"{}")
    assert lookup(c, scope="team-b").result == "miss"  # another team never sees it


# -- bounds ----------------------------------------------------------------------------------------------------


def test_bounded_by_entries_bytes_and_age_least_recently_used_first() -> None:
    clock = Clock()
    sizes: list[tuple[int, int]] = []
    c = ResponseCache(ResponseCacheConfig(max_entries=2, max_bytes=10, ttl_s=60), clock=clock,
                      on_change=lambda n, size: sizes.append((n, size)))
    c.put("a", body=b"aaa")
    c.put("b", body=b"bbb")
    assert c.get("a") is not None  # a is now the most recently used
    c.put("c", body=b"ccc")  # three entries: b goes
    assert (c.get("b"), len(c), c.size) == (None, 2, 6)
    assert c.put("d", chunks=(b"dddd", b"dd")) and c.get("a") is None and c.size == 9  # bytes: a goes too
    assert not c.put("e", body=b"e" * 11) and len(c) == 2  # larger than the whole cache: not kept
    clock.t += 60
    assert c.get("c") is None and c.get("d") is None and (len(c), c.size) == (0, 0)  # expired
    assert sizes[-1] == (0, 0)


@pytest.mark.parametrize("field", ["max_entries", "max_bytes", "ttl_s"])
def test_bounds_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"cache\.responses\.{field}"):
        gateway_config(cache={"responses": {field: 0}})


# -- after the dispatcher: what is kept, and the replay ---------------------------------------------------------


def _run(parts: Parts, backend: FakeBackend, c: ResponseCache, body: dict[str, Any]) -> tuple[Answer, Any]:
    """One request through lookup → dispatch (on a miss) → keep, as the ingress does it."""
    async def main() -> tuple[Answer, Any]:
        _, key = parts.keys.create(KeySpec(agent="bot"))
        ticket = parts.accounting.open(key, "fast", "chat")
        found = lookup(c, body)
        if found.hit is not None:
            return c.answer(found, "fast", ticket), found
        dispatcher = Dispatcher(parts.config, {"fast": backend}, backend)
        stream = bool(body.get("stream"))
        answer = await dispatcher.dispatch(BOTH, Request("chat", body, stream=stream), ticket)
        return c.keep(found, answer), found

    return asyncio.run(main())


async def _drain(answer: Answer) -> list[bytes]:
    assert answer.chunks is not None
    return [piece async for piece in answer.chunks]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return gateway_parts(tmp_path)


def test_a_whole_stream_is_kept_and_replayed_byte_for_byte(parts: Parts) -> None:
    c = cache()
    body = {**GREEDY, "stream": True}
    tier = FakeBackend([[chunk("a"), chunk("b"), Usage(1, 2), DONE]])
    answer, found = _run(parts, tier, c, body)
    assert found.result == "miss" and answer.headers["x-tierserve-cache"] == "miss"
    first = asyncio.run(_drain(answer))
    assert first == [chunk("a"), chunk("b"), DONE] and len(c) == 1

    replay, found = _run(parts, tier, c, body)
    assert found.result == "hit" and len(tier.calls) == 1  # the engine was not asked again
    assert replay.headers["x-tierserve-cache"] == "hit" and replay.headers["x-tierserve-provider"] == "cache"
    assert asyncio.run(_drain(replay)) == first
    # Accounted as served by the cache: a 200, no tokens, no engine time.
    assert parts.sample("tierserve_requests_total", tier="fast", provider="cache", endpoint="chat",
                        status="200") == 1
    assert parts.sample("tierserve_completion_tokens_total", tier="fast", provider="cache") == 0
    assert parts.sample("tierserve_requests_in_flight", tier="fast") == 0


def test_a_whole_answer_is_kept_and_an_error_is_not(parts: Parts) -> None:
    c = cache()
    tier = FakeBackend([Result(400, b'{"error": {}}'), Result(200, b'{"id": "x"}', Usage(1, 1))])
    bad, _ = _run(parts, tier, c, GREEDY)
    assert bad.result is not None and bad.result.status == 400 and len(c) == 0
    good, _ = _run(parts, tier, c, GREEDY)
    assert good.result is not None and good.result.status == 200 and len(c) == 1
    hit, found = _run(parts, tier, c, GREEDY)
    assert found.result == "hit" and hit.result is not None and hit.result.body == b'{"id": "x"}'


def test_a_providers_answer_is_not_kept(parts: Parts) -> None:
    c = cache()
    backend = FakeBackend([Result(503, b'{"error": {}}', failover=True), Result(200, b'{"id": "peer"}')])
    answer, _ = _run(parts, backend, c, GREEDY)  # the tier failed, the peer answered
    assert answer.headers["x-tierserve-provider"] == "peer" and answer.headers["x-tierserve-cache"] == "miss"
    assert len(c) == 0


def test_a_cut_stream_or_a_hang_up_keeps_nothing(parts: Parts) -> None:
    c = cache()
    body = {**GREEDY, "stream": True}
    cut = FakeBackend([[chunk("a"), RuntimeError("engine died"), DONE]])
    answer, _ = _run(parts, cut, c, body)
    chunks = asyncio.run(_drain(answer))
    assert b'"error"' in chunks[-1] and len(c) == 0  # the stream ended with an error event

    hung = FakeBackend([[chunk("a"), HANG]])
    answer, _ = _run(parts, hung, c, body)

    async def hang_up() -> None:
        assert answer.chunks is not None
        assert await answer.chunks.__anext__() == chunk("a")
        await answer.chunks.aclose()  # the client went away

    asyncio.run(hang_up())
    assert len(c) == 0 and hung.cancelled == 1  # and the backend's work was stopped
