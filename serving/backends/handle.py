"""A Ray Serve deployment handle (a tier deployment or the provider deployment) as a backend."""

from __future__ import annotations

import asyncio
from typing import Any

from serving.wire.backend import ItemStream
from serving.wire.items import Call, ReplicaPick, Result


class HandleBackend:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)

    async def complete(self, call: Call) -> Result:
        response = self.handle.complete.remote(call)
        try:
            result: Result = await response
        except asyncio.CancelledError:
            response.cancel()  # a timeout or a client gone: the replica stops working on it too
            raise
        return result

    def stream(self, call: Call) -> ItemStream:
        stream: ItemStream = self.streaming.stream.remote(call)  # DeploymentResponseGenerator: has cancel()
        return stream

    async def _call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    async def probe(self) -> float:
        latency: float = await self._call("probe")
        return latency

    async def waiting(self, replica: int = 0) -> tuple[str, int]:
        found, count = await self._call("waiting", ReplicaPick(replica))
        return found, count

    async def engine_metrics(self, replica: int = 0) -> tuple[str, str]:
        found, text = await self._call("engine_metrics", ReplicaPick(replica))
        return found, text

    async def gpu_snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = await self._call("gpu_snapshot")
        return snapshot
