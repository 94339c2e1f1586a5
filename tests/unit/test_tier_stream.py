"""A tier's stream: the Ray path's chunk coalescing (order kept, bytes joined, the source closed), and where
an engine error goes (before the first token: a Result the dispatcher may fail over; after it: in the stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from types import SimpleNamespace

import orjson

from serving.backends.tier import TierServer, Usage, _coalesced
from serving.wire.errors import ENGINE_DEAD
from serving.wire.items import Result, StreamItem
from serving.wire.sse import DONE


async def _source(items: list[bytes | Usage], closed: list[bool]) -> AsyncIterator[bytes | Usage]:
    try:
        for item in items:
            yield item
    finally:
        closed.append(True)


async def _collect(it: AsyncIterator[StreamItem]) -> list[StreamItem]:
    return [item async for item in it]


def test_waiting_bytes_are_joined_and_usage_and_done_keep_their_place() -> None:
    closed: list[bool] = []
    usage = Usage(7, 3)
    items: list[bytes | Usage] = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", usage, DONE]
    out = asyncio.run(_collect(_coalesced(_source(items, closed))))
    # Everything was ready at once: one send for the data, then the usage (not sent), then [DONE] alone.
    assert out == [b"data: 1\n\ndata: 2\n\ndata: 3\n\n", usage, DONE]
    assert closed == [True]


def test_chunks_that_arrive_apart_are_sent_apart() -> None:
    async def main() -> list[StreamItem]:
        later = asyncio.Event()

        async def source() -> AsyncIterator[bytes | Usage]:
            yield b"a"
            await later.wait()  # the next engine step
            yield b"b"

        stream = _coalesced(source())
        got = [await stream.__anext__()]
        later.set()
        got.extend([item async for item in stream])
        return got

    # Not held back to be joined with a later chunk: coalescing never delays a token.
    assert asyncio.run(main()) == [b"a", b"b"]


def test_a_consumer_that_leaves_early_closes_the_source() -> None:
    async def main() -> list[bool]:
        closed: list[bool] = []
        never = asyncio.Event()
        items: list[bytes | Usage] = [b"first", b"second"]

        async def source() -> AsyncIterator[bytes | Usage]:
            try:
                yield items[0]
                await never.wait()  # the engine has nothing more yet
                yield items[1]
            finally:
                closed.append(True)

        stream = _coalesced(source())
        assert await stream.__anext__() == b"first"
        await stream.aclose()  # the client hung up
        await asyncio.sleep(0)
        return closed

    assert asyncio.run(main()) == [True]


class _Bare(TierServer):
    def shutdown(self) -> None:
        pass  # no engine; and TierServer's would reap this test run's child processes (the shared app)


def _server(errored: bool) -> TierServer:
    server = object.__new__(_Bare)  # only the stream translation runs: no engine is started
    server.tier_name, server.engine = "coder", SimpleNamespace(errored=errored)
    return server


async def _vllm_stream(events: list[str], closed: list[bool]) -> AsyncGenerator[str, None]:
    try:
        for event in events:
            yield event
    finally:
        closed.append(True)


def _items(server: TierServer, events: list[str], closed: list[bool]) -> list[StreamItem]:
    async def main() -> list[StreamItem]:
        return [item async for item in server._items("chat", _vllm_stream(events, closed), True)]
    return asyncio.run(main())


DEAD = ('data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", '
        '"code": 500}}\n\n')


def test_an_engine_that_dies_before_the_first_token_leaves_the_request_free_to_go_elsewhere() -> None:
    closed: list[bool] = []
    out = _items(_server(errored=True), [DEAD, "data: [DONE]\n\n"], closed)
    assert len(out) == 1 and isinstance(out[0], Result)
    assert out[0].status == 503 and out[0].failover
    assert orjson.loads(out[0].body)["error"]["code"] == ENGINE_DEAD  # what ejects the tier
    assert closed == [True]


def test_a_request_error_before_the_first_token_is_the_clients_not_a_failover() -> None:
    bad = 'data: {"error": {"message": "bad logits processor", "type": "BadRequestError", "code": 400}}\n\n'
    out = _items(_server(errored=False), [bad, "data: [DONE]\n\n"], [])
    assert len(out) == 1 and isinstance(out[0], Result)
    assert out[0].status == 400 and not out[0].failover
    assert orjson.loads(out[0].body)["error"]["message"] == "bad logits processor"


def test_an_error_after_the_first_token_stays_in_the_stream() -> None:
    token = 'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    out = _items(_server(errored=True), [token, DEAD, "data: [DONE]\n\n"], [])
    assert out[0] == token.encode()
    assert isinstance(out[1], bytes)
    error = orjson.loads(out[1][6:])["error"]  # our envelope, a string code
    assert (error["message"], error["code"]) == ("EngineCore encountered an issue.", "internal_error")
    assert out[-1] == b"data: [DONE]\n\n"
