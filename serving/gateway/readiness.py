"""Readiness that proves generation: each tier answers a one-token probe, cached so probes can't overload it.

A tier is `ready` (its probe generated a token), `cold` (scaled to zero: not probed, since a probe would
wake it), or `failing` (probe error or timeout). The state machine is plain code with an injected clock
and probe function; the ingress supplies a probe through the tier's handle and the replica counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["ready", "cold", "failing"]


@dataclass
class TierHealth:
    state: State
    checked_at: float
    latency_s: float | None = None
    error: str | None = None
    replicas: int | None = None  # RUNNING replicas per the Serve controller, when it could be asked

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "replicas": self.replicas,
            "latency_s": None if self.latency_s is None else round(self.latency_s, 4),
            "error": self.error,
        }


@dataclass
class ReadinessProber:
    probe: Callable[[str], Awaitable[Any]]
    running_replicas: Callable[[str], Awaitable[int | None]]  # the router's count, up to a refresh interval old
    scale_to_zero: dict[str, bool]
    # Reads the controller now and updates the router's view.
    recount: Callable[[str], Awaitable[int | None]] | None = None
    # Told of every tier found ready: an ejected tier is back in routing the moment readiness says it can serve.
    passed: Callable[[str], None] | None = None
    cache_s: float = 5.0
    timeout_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    cache: dict[str, TierHealth] = field(default_factory=dict, init=False)
    locks: dict[str, asyncio.Lock] = field(init=False)

    def __post_init__(self) -> None:
        self.locks = {tier: asyncio.Lock() for tier in self.scale_to_zero}

    async def check(self, tier: str) -> TierHealth:
        cached = self.cache.get(tier)
        if cached and self.clock() - cached.checked_at < self.cache_s:
            return cached
        async with self.locks[tier]:  # concurrent health checks share one probe
            cached = self.cache.get(tier)
            if cached and self.clock() - cached.checked_at < self.cache_s:
                return cached
            result = await self._probe(tier)
            self.cache[tier] = result
            return result

    async def _probe(self, tier: str) -> TierHealth:
        running = await self.running_replicas(tier)
        if running == 0 and self.scale_to_zero[tier]:
            return TierHealth("cold", self.clock(), replicas=0)
        start = self.clock()
        try:
            await asyncio.wait_for(self.probe(tier), self.timeout_s)
        except Exception as exc:
            error = f"probe timed out after {self.timeout_s:g}s" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {exc}"[:300]
            if self.recount is not None:
                # The replica may be dead: re-read the counts now, not at the router's next scheduled read,
                # so this tier's requests stop going where Ray's handle would hold them for a replacement.
                running = await self.recount(tier)
            return TierHealth("failing", self.clock(), error=error, replicas=running)
        latency = self.clock() - start
        if running == 0 and self.recount is not None:
            # It generated, yet the router's view (refreshed every second while replicas change) has no running
            # replica: a replica that came up since. Ready must mean the router sends requests there too, or a
            # client that waited for ready gets 503 "no healthy replica" (seen after a restart).
            running = await self.recount(tier)
            if running == 0:
                error = "generated, but the Serve controller reports no RUNNING replica yet"
                return TierHealth("failing", self.clock(), error=error, replicas=0)
        if self.passed is not None:
            self.passed(tier)
        return TierHealth("ready", self.clock(), latency_s=latency, replicas=running)

    async def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 when any tier is failing, so a load balancer takes the node out."""
        tiers = list(self.scale_to_zero)
        results = await asyncio.gather(*(self.check(t) for t in tiers))
        states = {t: r.to_dict() for t, r in zip(tiers, results, strict=True)}
        failing = any(r.state == "failing" for r in results)
        return (503 if failing else 200), {"status": "failing" if failing else "ready", "tiers": states}
