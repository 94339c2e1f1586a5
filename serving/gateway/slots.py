"""Engine slots kept free of batch work, so an interactive request never waits for one.

vLLM orders its waiting queue by priority but does not preempt a running request for a waiting one (only when
the KV cache runs out). On a tier whose slots (`engine.max_num_seqs` per replica) are all held by a batch key's
long streams, an interactive request would still wait for one of them to end. A tier's `slots.batch_per_replica`
caps the requests of batch keys in flight on it; the next ones wait here, in arrival order, until one ends or
their caller's deadline passes.

The count is this ingress replica's: with several ingress replicas, each holds its own share.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class SlotsFull(Exception):
    """Waited for a batch slot until the deadline."""

    def __init__(self, tier: str, limit: int) -> None:
        super().__init__(f"tier {tier}: its {limit} batch slots stayed full")
        self.tier, self.limit = tier, limit


class Slot:
    """A held slot; `release` is idempotent (a request's ending may be reached by more than one path)."""

    __slots__ = ("gate", "held", "queued_s", "tier")

    def __init__(self, gate: BatchSlots, tier: str, queued_s: float | None = None) -> None:
        self.gate, self.tier, self.held = gate, tier, True
        self.queued_s = queued_s  # how long it waited for the slot; None: one was free

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate._release(self.tier)


class BatchSlots:
    """Per tier: how many batch requests are in flight, and who waits for a slot (first come, first served)."""

    def __init__(self, on_change: Callable[[str, int, int], None] | None = None) -> None:
        self.in_flight: dict[str, int] = {}
        self.queues: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self.on_change = on_change  # (tier, in flight, waiting): the metrics

    def _changed(self, tier: str) -> None:
        if self.on_change is not None:
            self.on_change(tier, self.in_flight.get(tier, 0), self.waiting(tier))

    def waiting(self, tier: str) -> int:
        return sum(1 for _, f in self.queues.get(tier, ()) if not f.done())

    async def hold(self, tier: str, limit: int, timeout_s: float) -> Slot:
        """A slot of `tier` once fewer than `limit` are held; SlotsFull after `timeout_s` without one."""
        queue = self.queues.setdefault(tier, deque())
        if self.in_flight.get(tier, 0) < limit and not any(not f.done() for _, f in queue):
            self.in_flight[tier] = self.in_flight.get(tier, 0) + 1
            self._changed(tier)
            return Slot(self, tier)
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        turn: asyncio.Future[None] = loop.create_future()
        queue.append((limit, turn))
        self._changed(tier)
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout_s)
        except BaseException as exc:  # the deadline passed, or the caller went away while waiting
            granted = turn.done() and not turn.cancelled()
            turn.cancel()
            if granted:  # granted as it gave up: hand the slot on
                self._release(tier)
            else:
                self._changed(tier)
            if isinstance(exc, TimeoutError):
                raise SlotsFull(tier, limit) from None
            raise
        return Slot(self, tier, loop.time() - queued_at)

    def _release(self, tier: str) -> None:
        self.in_flight[tier] -= 1
        self._grant(tier)
        self._changed(tier)

    def _grant(self, tier: str) -> None:
        """Wake waiters in order while their limit allows; a granted waiter already counts as in flight."""
        queue = self.queues.get(tier)
        while queue:
            limit, turn = queue[0]
            if turn.done():  # gave up
                queue.popleft()
                continue
            if self.in_flight.get(tier, 0) >= limit:
                return
            queue.popleft()
            self.in_flight[tier] = self.in_flight.get(tier, 0) + 1
            turn.set_result(None)
