"""Keep-warm schedule: pings only inside the working-hours window, at the configured interval."""

from __future__ import annotations

import asyncio
from datetime import datetime, time

import pytest

from serving.config import Replicas
from serving.gateway.warmup import due, in_window, keep_warm_loop, parse_window


def test_window_parsing_and_wrapping() -> None:
    day = parse_window("08:00-18:00")
    night = parse_window("22:00-06:00")
    assert day == (time(8), time(18))
    assert in_window(time(8), day) and in_window(time(17, 59), day)
    assert not in_window(time(18), day) and not in_window(time(7, 59), day)
    assert in_window(time(23), night) and in_window(time(5), night) and not in_window(time(12), night)
    assert all(in_window(time(h), parse_window("00:00-00:00")) for h in range(24))


def test_due_respects_interval_and_window() -> None:
    window = parse_window("08:00-18:00")
    nine = datetime(2026, 11, 23, 9, 0, 0)
    assert due(nine, None, 300, window)
    assert not due(nine, nine.timestamp() - 299, 300, window)
    assert due(nine, nine.timestamp() - 300, 300, window)
    assert not due(datetime(2026, 11, 23, 19, 0), None, 300, window)


def test_config_defaults_interval_to_half_the_downscale_delay() -> None:
    assert Replicas(min=0, max=1, downscale_delay_s=600, keep_warm_hours="08:00-18:00").keep_warm() == (
        "08:00-18:00", 300.0)
    assert Replicas().keep_warm() is None
    with pytest.raises(ValueError, match="not a time of day"):
        Replicas(keep_warm_hours="25:00-26:00")


def test_loop_pings_due_tiers_and_survives_failures() -> None:
    clock = iter([datetime(2026, 11, 23, 9, 0, s) for s in range(0, 60, 10)])
    pings: list[str] = []

    enough = asyncio.Event()

    async def ping(tier: str) -> None:
        pings.append(tier)
        if len(pings) >= 4:
            enough.set()
        if tier == "bad":
            raise RuntimeError("replica down")

    async def run() -> None:
        tiers = {"fast": (parse_window("08:00-18:00"), 20.0), "bad": (parse_window("08:00-18:00"), 1000.0),
                 "night": (parse_window("22:00-06:00"), 1.0)}
        task = asyncio.create_task(keep_warm_loop(tiers, ping, now=lambda: next(clock), tick_s=0))
        await asyncio.wait_for(enough.wait(), 5)
        task.cancel()

    asyncio.run(run())
    # t=0: fast, bad; t=20: fast; t=40: fast. `night` is outside its window, `bad` not due again.
    assert pings[:4] == ["fast", "bad", "fast", "fast"]
