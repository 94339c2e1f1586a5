"""CPU per streamed chunk of TierServer's own stream plumbing, the Ray path (coalesced) against the embedded
path (direct), without an engine: a source steps every stream once per "engine step", the way vLLM's output
handler wakes each request's generator. Measures only the code between vLLM's chunk strings and the ingress.

    python -m benchmarks.streampath [--streams 16] [--tokens 64] [--rounds 20]

Prints one JSON line per path and repeat: microseconds of process CPU per chunk (the source's share included,
the same for both paths).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.backends.tier import TierServer
from serving.wire.items import Call

CHUNK = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    '"delta":{"content":" tok"},"logprobs":null,"finish_reason":null}]}\n\n'
)
USAGE = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    '"usage":{"prompt_tokens":5,"total_tokens":69,"completion_tokens":64}}\n\n'
)


class Steps:
    """Wakes every waiting stream once per step, like vLLM's output handler after an engine step."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []

    async def chunks(self, tokens: int) -> AsyncIterator[str]:
        for _ in range(tokens):
            step = asyncio.get_running_loop().create_future()
            self.waiting.append(step)
            await step
            yield CHUNK
        yield USAGE
        yield "data: [DONE]\n\n"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0)
            woken, self.waiting = self.waiting, []
            for step in woken:
                step.set_result(None)
            if not woken:
                await asyncio.sleep(0.0005)


class _Server:
    """The parts of a TierServer that `stream` uses, with `_start` handing out the synthetic chunks."""

    tier_name = "bench"
    _items = TierServer._items
    _map_exception = TierServer._map_exception

    def __init__(self, steps: Steps, tokens: int) -> None:
        self.steps, self.tokens = steps, tokens

    class tracing:  # stands in for the Tracing instance
        @staticmethod
        def span(*_: Any, **__: Any) -> contextlib.nullcontext[None]:
            return contextlib.nullcontext()

    async def _start(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[str]:
        return self.steps.chunks(self.tokens)


async def per_chunk_us(coalesce: bool, streams: int, tokens: int, rounds: int) -> float:
    steps = Steps()
    stepping = asyncio.create_task(steps.run())
    server = _Server(steps, tokens)
    call = Call("chat", {"stream_options": {"include_usage": True}}, "bench")

    async def one() -> None:
        async for _ in TierServer.stream(server, call, coalesce):  # type: ignore[arg-type]
            pass

    start = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(streams)))
    spent = time.process_time() - start
    stepping.cancel()
    return spent / (rounds * streams * tokens) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streampath", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    for _ in range(a.repeats):
        for path, coalesce in (("coalesced (Ray path)", True), ("direct (embedded)", False)):
            us = asyncio.run(per_chunk_us(coalesce, a.streams, a.tokens, a.rounds))
            print(json.dumps({"path": path, "streams": a.streams, "us_per_chunk": round(us, 2)}))


if __name__ == "__main__":
    main()
