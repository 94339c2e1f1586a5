"""/health/ready's per-tier probe: ready means the tier generates *and* the router counts a replica for it."""

from __future__ import annotations

import asyncio

import pytest

from serving.gateway.readiness import ReadinessProber


def prober(counts: list[int | None], recounts: list[int | None], fails: Exception | None = None,
           scale_to_zero: bool = False) -> tuple[ReadinessProber, list[str]]:
    calls: list[str] = []

    async def probe(tier: str) -> None:
        calls.append("probe")
        if fails:
            raise fails

    async def running(tier: str) -> int | None:
        calls.append("count")
        return counts.pop(0)

    async def recount(tier: str) -> int | None:
        calls.append("recount")
        return recounts.pop(0)

    return ReadinessProber(probe, running, {"fast": scale_to_zero}, recount=recount, cache_s=0), calls


def check(p: ReadinessProber) -> dict:
    return asyncio.run(p.check("fast")).to_dict()


def test_ready_with_a_counted_replica_does_not_ask_the_controller_again() -> None:
    p, calls = prober(counts=[1], recounts=[])
    assert check(p)["state"] == "ready" and calls == ["count", "probe"]


def test_replica_the_router_has_not_counted_yet_is_recounted() -> None:
    # The router's view still says 0 (read before the replica came up); the probe generated through the handle.
    p, calls = prober(counts=[0], recounts=[1])
    result = check(p)
    assert (result["state"], result["replicas"]) == ("ready", 1) and calls == ["count", "probe", "recount"]


def test_generating_but_not_running_for_the_controller_is_not_ready() -> None:
    p, _ = prober(counts=[0], recounts=[0])
    result = check(p)
    assert result["state"] == "failing" and "no RUNNING replica" in result["error"]


@pytest.mark.parametrize("count", [1, 0, None])
def test_probe_failure_is_failing_and_recounts_the_replicas(count: int | None) -> None:
    # The router still counts the dead replica: a failed probe re-reads the counts, so requests stop going
    # there (to wait in Ray's handle for a replacement) before the next scheduled read.
    p, calls = prober(counts=[count], recounts=[0], fails=RuntimeError("engine dead"))
    result = check(p)
    assert result["state"] == "failing" and "engine dead" in result["error"]
    assert calls == ["count", "probe", "recount"] and result["replicas"] == 0


def test_scaled_to_zero_tier_is_cold_without_a_probe() -> None:
    p, calls = prober(counts=[0], recounts=[], scale_to_zero=True)
    assert check(p)["state"] == "cold" and calls == ["count"]
