"""The one interface the dispatcher calls: a tier deployment's handle, the tier embedded in the ingress, or the
provider deployment's handle all look like this (as vLLM's `EngineClient` does for its engines)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serving.wire.items import Call, Result, StreamItem


class ItemStream(Protocol):
    """A started stream of items; `cancel()` aborts the work behind it (the engine request, the upstream)."""

    def __aiter__(self) -> AsyncIterator[StreamItem]: ...

    async def __anext__(self) -> StreamItem: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    async def complete(self, call: Call) -> Result: ...

    def stream(self, call: Call) -> ItemStream: ...


class TierBackend(Backend, Protocol):
    """A tier: also what readiness, the router's view and telemetry ask of it."""

    async def probe(self) -> float: ...

    # (replica id, its reading) of the `replica`-th running replica (serving/wire/items.py ReplicaPick).
    async def waiting(self, replica: int = 0) -> tuple[str, int]: ...

    async def engine_metrics(self, replica: int = 0) -> tuple[str, str]: ...

    async def gpu_snapshot(self) -> dict[str, Any]: ...
