"""Outlier ejection of tiers: a tier whose replica died leaves routing at once, until a probe generates again.

Envoy's outlier detection on consecutive errors, applied to the tiers' Serve replicas. A call that failed because
its replica is gone (a dead actor, an unavailable replica, an engine that died) is a failure; `threshold` of them
in a row, or the Serve controller reporting no RUNNING replica, eject the tier without waiting for the
controller to start a replacement. While a tier is ejected the router skips it (its overflow policy decides:
a provider, or 503 with Retry-After), and requests already waiting for its first byte are woken so the dispatcher
sends them elsewhere. A readiness probe that generates brings the tier back (the fleet runs it).

Plain state with an injected clock. The wake-up is an asyncio Event per tier: making one needs no loop, waiting
on one does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

REPLICA_DIED = "replica died"
REPLICA_UNAVAILABLE = "replica unavailable"
ENGINE_DIED = "engine died"
NO_RUNNING_REPLICA = "no running replica"


@dataclass(frozen=True, slots=True)
class Ejection:
    reason: str
    since: float  # clock time


class TierEjected(Exception):
    """The tier was ejected while a request waited for its first byte: nothing reached the client."""

    def __init__(self, tier: str, reason: str) -> None:
        super().__init__(f"tier {tier} ejected ({reason})")
        self.tier = tier
        self.reason = reason


class Ejector:
    def __init__(
        self,
        tiers: Iterable[str],
        *,
        threshold: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str | None], None] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.threshold = threshold
        self.clock = clock
        self.on_change = on_change  # (tier, reason) when ejected, (tier, None) when restored
        names = list(tiers)
        self.failures = dict.fromkeys(names, 0)  # consecutive, since the last success or restore
        self.ejections = dict.fromkeys(names, 0)
        self.current: dict[str, Ejection] = {}
        self.last_duration_s: dict[str, float] = {}
        self._events = {name: asyncio.Event() for name in names}

    def reason(self, tier: str) -> str | None:
        """Why the tier is out of routing; None while it is in."""
        ejection = self.current.get(tier)
        return ejection.reason if ejection is not None else None

    def ejected(self) -> list[str]:
        return list(self.current)

    def wakeup(self, tier: str) -> asyncio.Event:
        """Set once the tier is ejected (already set while it is): what a request waiting on it also waits for."""
        return self._events[tier]

    def failed(self, tier: str, reason: str) -> bool:
        """A call to the tier failed because a replica or its engine is gone; True when that ejected it."""
        if tier not in self.failures:
            return False
        self.failures[tier] += 1
        return self.failures[tier] >= self.threshold and self.eject(tier, reason)

    def succeeded(self, tier: str) -> None:
        """The tier answered: the run of failures is broken (an ejected tier stays out until its probe passes)."""
        if tier in self.failures:
            self.failures[tier] = 0

    def eject(self, tier: str, reason: str) -> bool:
        """Out of routing now, and every waiter woken; False when it already was (or is unknown)."""
        if tier not in self._events or tier in self.current:
            return False
        self.current[tier] = Ejection(reason, self.clock())
        self.ejections[tier] += 1
        self._events[tier].set()
        if self.on_change is not None:
            self.on_change(tier, reason)
        return True

    def restore(self, tier: str) -> bool:
        """A probe generated: back in routing, with a fresh wake-up for the next ejection."""
        ejection = self.current.pop(tier, None)
        if ejection is None:
            return False
        self.failures[tier] = 0
        self.last_duration_s[tier] = self.clock() - ejection.since
        self._events[tier] = asyncio.Event()
        if self.on_change is not None:
            self.on_change(tier, None)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per tier, for /health/providers: the tiers' breaker states beside the providers'."""
        now = self.clock()
        out: dict[str, dict[str, Any]] = {}
        for tier, failures in self.failures.items():
            ejection = self.current.get(tier)
            out[tier] = {
                "state": "ejected" if ejection else "ok",
                "reason": ejection.reason if ejection else None,
                "ejected_for_s": round(now - ejection.since, 3) if ejection else None,
                "consecutive_failures": failures,
                "ejections": self.ejections[tier],
                "last_ejection_s": round(self.last_duration_s[tier], 3) if tier in self.last_duration_s else None,
            }
        return out
