"""Keep-warm: ping a tier during working hours so it doesn't scale to zero while agents still need it.

The decision is a pure function of the local time, the tier's window and the last ping; the ingress runs
the loop. A ping is the tier's one-token probe, so it also wakes a cold tier ahead of the first agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, time

log = logging.getLogger(__name__)


def parse_window(window: str) -> tuple[time, time]:
    """'08:00-18:00' -> (08:00, 18:00). A window may wrap midnight ('22:00-06:00'); equal ends: all day."""
    start, _, end = window.partition("-")
    return time.fromisoformat(start.strip()), time.fromisoformat(end.strip())


def in_window(now: time, window: tuple[time, time]) -> bool:
    start, end = window
    if start == end:  # '00:00-00:00': all day
        return True
    return start <= now < end if start < end else now >= start or now < end


def due(now: datetime, last_ping: float | None, interval_s: float, window: tuple[time, time]) -> bool:
    if not in_window(now.time(), window):
        return False
    return last_ping is None or now.timestamp() - last_ping >= interval_s


async def keep_warm_loop(
    tiers: dict[str, tuple[tuple[time, time], float]],
    ping: Callable[[str], Awaitable[object]],
    *,
    now: Callable[[], datetime] = datetime.now,
    tick_s: float | None = None,
) -> None:
    """Run forever: ping each tier (window, interval) when due. Failures are logged, never fatal."""
    if tick_s is None:  # fine enough for the shortest interval, never busier than once a second
        tick_s = max(1.0, min(10.0, *(interval / 2 for _, interval in tiers.values())))
    last: dict[str, float] = {}
    while True:
        current = now()
        for tier, (window, interval_s) in tiers.items():
            if due(current, last.get(tier), interval_s, window):
                last[tier] = current.timestamp()
                try:
                    await ping(tier)
                except Exception as exc:
                    log.warning("keep-warm ping to tier %s failed: %s", tier, exc)
        await asyncio.sleep(tick_s)
