"""A tier whose engine runs inside the ingress replica (`ingress.embed_tier`): the same backend interface as a
tier deployment's handle, with no Ray hop, no copy per chunk and no serialisation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.backends.tier import TierServer
from serving.wire.items import Call, Result, StreamItem

log = logging.getLogger(__name__)


class LocalTier:
    """A TierServer in the caller's own process. A dead engine is replaced in place (see `check_health`)."""

    def __init__(self, server: TierServer, make: Callable[[], TierServer]) -> None:
        self.server = server
        self.make = make  # builds a new TierServer (blocking: it loads the model)
        self.replacing: asyncio.Future[None] | None = None
        self.replacements = 0

    # -- the backend interface -------------------------------------------------------------------------------

    async def complete(self, call: Call) -> Result:
        return await self.server.complete(call)

    def stream(self, call: Call) -> LocalStream:
        # In process there is no Ray transfer per chunk to save, so no coalescing task either.
        return LocalStream(self.server.stream(call, coalesce=False))

    async def probe(self) -> float:
        return await self.server.probe()

    async def waiting(self, replica: int = 0) -> tuple[str, int]:
        return await asyncio.to_thread(self.server.waiting)  # a registry read may block; one replica: this one

    async def engine_metrics(self, replica: int = 0) -> tuple[str, str]:
        return await asyncio.to_thread(self.server.engine_metrics)

    async def gpu_snapshot(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.server.gpu_snapshot)  # NVML calls block

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def running(self) -> int:
        return self.server.running()

    async def check_health(self) -> None:
        """The embedding replica's health check. A dead engine is replaced in place, in the background: the
        gateway and the other tiers keep serving, and this tier's requests go where its overflow policy says
        until the new engine is up. Only a replacement that fails fails the check (Ray then replaces the
        whole replica)."""
        if self.replacing is not None:
            if not self.replacing.done():
                return
            done, self.replacing = self.replacing, None
            done.result()
        try:
            await self.server.check_health()
        except Exception as exc:
            log.error("tier %s: engine is dead (%s); starting a new one in this replica", self.server.tier_name, exc)
            self.replacing = asyncio.ensure_future(self._replace())

    async def _replace(self) -> None:
        await asyncio.to_thread(self.server.shutdown)
        self.server = await asyncio.to_thread(self.make)
        self.replacements += 1
        log.info("tier %s: new engine ready (replacement %d)", self.server.tier_name, self.replacements)

    def shutdown(self) -> None:
        self.server.shutdown()


class LocalStream:
    """An in-process stream with a handle's `cancel()`: closing it aborts the request in the engine."""

    __slots__ = ("gen",)

    def __init__(self, gen: AsyncIterator[StreamItem]) -> None:
        self.gen = gen

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> StreamItem:
        return await self.gen.__anext__()

    def cancel(self) -> None:
        task = asyncio.ensure_future(_close(self.gen))
        _closing.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


async def _close(gen: Any) -> None:
    # The generator's own `finally` aborts the engine request. One that is mid-step was already closed by its
    # cancelled step (aclose() then says "already running").
    with contextlib.suppress(RuntimeError):
        await gen.aclose()
