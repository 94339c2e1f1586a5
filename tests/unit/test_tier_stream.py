"""The Ray path's chunk coalescing (serving.backends.tier._coalesced): order kept, bytes joined, the source closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serving.backends.tier import Usage, _coalesced
from serving.wire.sse import DONE


async def _source(items: list[bytes | Usage], closed: list[bool]) -> AsyncIterator[bytes | Usage]:
    try:
        for item in items:
            yield item
    finally:
        closed.append(True)


async def _collect(it: AsyncIterator[bytes | Usage]) -> list[bytes | Usage]:
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
    async def main() -> list[bytes | Usage]:
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
