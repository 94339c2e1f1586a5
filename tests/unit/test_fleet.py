"""How often the ingress asks the Serve controller for replica counts (the costliest background call)."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import build_config, deployment_name
from serving.gateway.fleet import STABLE_REPLICAS_TTL_S, Fleet

TINY = {"tiny_seed": 1}


def status_with(states: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {deployment_name(t): s for t, s in states.items()}


def test_replica_counts_are_read_rarely_when_settled_and_at_once_when_changing(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.gateway import fleet as fleet_module

    config = build_config({"tiers": {"fast": {"served_name": "f", "model": TINY}}}, None)
    fleet = Fleet(config, {}, "app")
    current = {"fast": {"RUNNING": 1}}
    calls: list[int] = []

    def status(app: str) -> dict[str, dict[str, int]]:
        assert app == "app"
        calls.append(1)
        return status_with(current)

    monkeypatch.setattr(fleet_module, "controller_replica_states", status)
    clock = {"now": 1000.0}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "time", lambda: clock["now"])
        await fleet.refresh_states()  # first read
        assert fleet.replicas == {"fast": 1} and fleet.settled and len(calls) == 1
        clock["now"] += 1
        await fleet.refresh_states()  # settled: not asked again within the stable interval
        assert len(calls) == 1
        await fleet.refresh_states(replicas=True)  # a tier call failed: asked at once
        assert len(calls) == 2
        current["fast"] = {"RUNNING": 1, "STARTING": 1}
        clock["now"] += STABLE_REPLICAS_TTL_S
        await fleet.refresh_states()  # the stable interval passed: asked, and now it is changing
        assert len(calls) == 3 and not fleet.settled
        clock["now"] += 1
        await fleet.refresh_states()  # changing: asked every refresh
        assert len(calls) == 4
        current["fast"] = {"RUNNING": 2}
        clock["now"] += 1
        await fleet.refresh_states()
        assert fleet.replicas == {"fast": 2} and fleet.settled and len(calls) == 5

    asyncio.run(run())


class EmbeddedEngine:
    """What Fleet reads of an embedded tier: whether its engine runs (the engine itself is in e2e tests)."""

    def __init__(self) -> None:
        self.alive = 1

    def running(self) -> int:
        return self.alive


def test_embedded_tier_is_counted_in_process_and_never_asked_of_the_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.gateway import fleet as fleet_module

    config = build_config({"ingress": {"embed_tier": "fast"}, "tiers": {
        "fast": {"served_name": "f", "model": TINY}, "coder": {"served_name": "c", "model": TINY}}}, None)
    embedded = EmbeddedEngine()
    fleet = Fleet(config, {}, "app", local={"fast": embedded})
    calls: list[int] = []

    def status(app: str) -> dict[str, dict[str, int]]:  # the controller knows only the deployments: coder's
        calls.append(1)
        return status_with({"coder": {"RUNNING": 1}})

    monkeypatch.setattr(fleet_module, "controller_replica_states", status)

    async def run() -> None:
        await fleet.refresh_states()
        assert fleet.replicas == {"coder": 1, "fast": 1} and fleet.settled
        embedded.alive = 0  # the engine died: out of the router's candidates at the next refresh
        await fleet.refresh_states(replicas=True)
        assert fleet.replicas["fast"] == 0 and await fleet.running_replicas("fast") == 0
        assert len(calls) == 2

    asyncio.run(run())

    only = build_config({"ingress": {"embed_tier": "fast"}, "tiers": {"fast": {"served_name": "f", "model": TINY}}},
                        None)
    alone = Fleet(only, {}, "app", local={"fast": embedded})
    asyncio.run(alone.refresh_states())
    assert alone.replicas == {"fast": 0} and len(calls) == 2  # only embedded tiers: no controller call at all


def test_tier_ready_gauge_follows_the_routers_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """tierserve_tier_ready, which the "tier not ready" alert reads: 0 for a tier with no RUNNING replica, 1 for
    one scaled to zero (a request starts it), no sample before the first read."""
    from prometheus_client import CollectorRegistry

    from serving.gateway import fleet as fleet_module
    from serving.ops.metrics import RequestMetrics

    config = build_config({"tiers": {
        "coder": {"served_name": "c", "model": TINY},
        "fast": {"served_name": "f", "model": TINY, "replicas": {"min": 0, "max": 1}}}}, None)
    fleet = Fleet(config, {}, "app")
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    fleet.export_readiness(metrics)
    assert registry.get_sample_value("tierserve_tier_ready", {"tier": "coder"}) is None
    current = {"coder": {"RUNNING": 1}, "fast": {}}
    monkeypatch.setattr(fleet_module, "controller_replica_states", lambda app: status_with(current))
    asyncio.run(fleet.refresh_replicas())
    fleet.export_readiness(metrics)
    assert registry.get_sample_value("tierserve_tier_ready", {"tier": "coder"}) == 1
    assert registry.get_sample_value("tierserve_tier_ready", {"tier": "fast"}) == 1
    current["coder"] = {"STARTING": 1}  # its replica died; the replacement is not up yet
    asyncio.run(fleet.refresh_replicas())
    fleet.export_readiness(metrics)
    assert registry.get_sample_value("tierserve_tier_ready", {"tier": "coder"}) == 0
