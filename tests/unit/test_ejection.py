"""Tier outlier ejection: the ejector's state, the dispatcher waking requests that wait on an ejected tier and
sending them on (once per candidate), the router skipping an ejected tier, and the fleet ejecting a tier with no
running replica and bringing it back when a probe generates. In-memory backends; the real replica kill is in
tests/e2e/test_replica_kill.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from serving.config import AppConfig, EjectionConfig, build_config, deployment_name
from serving.gateway.dispatch import Dispatcher, Request
from serving.gateway.ejection import Ejector
from serving.gateway.fleet import Fleet
from serving.gateway.router import Candidate, Decision, RequestFacts, Router, TierState
from serving.ops.metrics import RequestMetrics
from serving.security.keys import KeySpec
from serving.wire.errors import ENGINE_DEAD, APIError
from serving.wire.items import Result, Usage
from tests.support.clock import Clock
from tests.support.gateway import HANG, FakeBackend, Parts, gateway_parts

CHAT = Request("chat", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, stream=False)
STREAM = Request("chat", {**CHAT.body, "stream": True}, stream=True)
TIER = Candidate("tier", "fast", "fast", "model:fast")
PEER = Candidate("provider", "peer", "fast", "model:fast->provider:peer")
BOTH = Decision("tier", "fast", "model:fast", (TIER, PEER))
ALONE = Decision("tier", "fast", "model:fast", (TIER,))
TINY = {"tiny_seed": 1}


def ok(text: str = "hello") -> Result:
    return Result(200, orjson.dumps({"text": text}), Usage(3, 2))


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return gateway_parts(tmp_path)


def ticket(parts: Parts):  # type: ignore[no-untyped-def]
    _, key = parts.keys.create(KeySpec(agent="bot"))
    return parts.accounting.open(key, "fast", "chat")


# -- the ejector -------------------------------------------------------------------------------------------


def test_consecutive_failures_eject_and_a_success_breaks_the_run() -> None:
    clock = Clock()
    changes: list[tuple[str, str | None]] = []
    ejector = Ejector(["fast", "coder"], threshold=3, clock=clock, on_change=lambda t, r: changes.append((t, r)))
    assert not ejector.failed("fast", "replica died") and not ejector.failed("fast", "replica died")
    ejector.succeeded("fast")
    assert not ejector.failed("fast", "replica died") and not ejector.failed("fast", "replica died")
    assert ejector.reason("fast") is None and not ejector.wakeup("fast").is_set()
    assert ejector.failed("fast", "replica died")
    assert ejector.reason("fast") == "replica died" and ejector.wakeup("fast").is_set()
    assert ejector.reason("coder") is None and not ejector.wakeup("coder").is_set()
    assert not ejector.eject("fast", "again")  # once per outage
    clock.t += 12.5
    snap = ejector.snapshot()["fast"]
    assert snap["state"] == "ejected" and snap["ejected_for_s"] == 12.5 and snap["ejections"] == 1
    old = ejector.wakeup("fast")
    assert ejector.restore("fast") and not ejector.restore("fast")
    assert ejector.reason("fast") is None and ejector.last_duration_s["fast"] == 12.5
    assert old.is_set() and not ejector.wakeup("fast").is_set()  # a fresh wake-up for the next outage
    assert changes == [("fast", "replica died"), ("fast", None)]
    assert not ejector.failed("unknown", "replica died")


# -- the dispatcher ----------------------------------------------------------------------------------------


class ByKind(FakeBackend):
    """The same script for every call of a kind: whatever order concurrent calls start in."""

    def __init__(self, answer: object, stream: list[object]) -> None:
        super().__init__()
        self.answer, self.steps = answer, stream

    def _next(self, call):  # type: ignore[no-untyped-def]
        self.calls.append(call)
        return self.steps if call.body.get("stream") else self.answer


def test_requests_waiting_on_a_tier_go_to_the_next_candidate_when_it_is_ejected(parts: Parts) -> None:
    """Four requests wait for a tier's first byte (Ray's handle holding them for a replica that is gone); the
    tier is ejected: each goes to the provider at once, exactly once, streams and non-streamed alike, and the
    tier's calls are cancelled."""
    tier = ByKind(HANG, [HANG])
    peer = ByKind(ok("p"), [b"data: 1\n\n", Usage(1, 1), b"data: [DONE]\n\n"])
    ejector = Ejector(["fast"], threshold=3)
    dispatcher = Dispatcher(parts.config, {"fast": tier}, peer, ejector=ejector)

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        waiting = [loop.create_task(dispatcher.dispatch(BOTH, req, ticket(parts)))
                   for req in (CHAT, STREAM, CHAT, STREAM)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting) and len(tier.calls) == 4 and not peer.calls
        started = loop.time()
        ejector.eject("fast", "replica died")
        answers = await asyncio.gather(*waiting)
        assert loop.time() - started < 0.5
        for answer in answers:
            if answer.chunks is not None:
                assert [c async for c in answer.chunks] == [b"data: 1\n\n", b"data: [DONE]\n\n"]
        return [a.headers["x-tierserve-provider"] for a in answers] + [a.headers["x-tierserve-route-reason"]
                                                                        for a in answers[:1]]

    providers = asyncio.run(run())
    assert providers[:4] == ["peer"] * 4
    assert providers[4].startswith("fallback after tier fast failed (503: tier fast ejected (replica died))")
    assert len(tier.calls) == 4 and len(peer.calls) == 4  # each candidate once per request
    assert tier.cancelled == 2  # the two streams' calls were cancelled (non-streamed: their tasks were)
    assert parts.sample("tierserve_requests_total", tier="fast", provider="peer", endpoint="chat",
                        status="200") == 4


def test_an_ejected_tier_with_no_other_candidate_is_a_503_with_retry_after_at_once(parts: Parts) -> None:
    ejector = Ejector(["fast"])
    ejector.eject("fast", "no running replica")
    dispatcher = Dispatcher(parts.config, {"fast": FakeBackend([[HANG]])}, None, ejector=ejector)
    with pytest.raises(APIError) as err:
        asyncio.run(asyncio.wait_for(dispatcher.dispatch(ALONE, STREAM, ticket(parts)), 1))
    assert err.value.status == 503 and "tier fast ejected (no running replica)" in err.value.message
    assert err.value.headers["retry-after"] == str(parts.config.routing.unavailable_retry_after_s)


def test_replica_gone_failures_feed_the_ejector_and_other_failures_do_not(parts: Parts) -> None:
    ejector = Ejector(["fast"], threshold=3)
    engine_dead = Result.error(APIError(503, "tier fast: engine is dead", code=ENGINE_DEAD))
    overloaded = Result.error(APIError(503, "busy"))
    tier = FakeBackend([BackPressureError(num_queued_requests=1, max_queued_requests=1), overloaded,
                        ActorDiedError(), engine_dead, ok(), ActorDiedError(), ActorDiedError(), engine_dead])
    dispatcher = Dispatcher(parts.config, {"fast": tier}, FakeBackend([ok()] * 8), ejector=ejector)

    def one() -> str:
        return asyncio.run(dispatcher.dispatch(BOTH, CHAT, ticket(parts))).headers["x-tierserve-provider"]

    assert [one(), one()] == ["peer", "peer"] and ejector.failures["fast"] == 0  # a full queue, an overload
    assert [one(), one()] == ["peer", "peer"] and ejector.failures["fast"] == 2  # a dead actor, a dead engine
    assert one() == "local" and ejector.failures["fast"] == 0  # an answer breaks the run
    one(), one()
    assert ejector.reason("fast") is None
    one()
    assert ejector.reason("fast") == "engine died"


def with_ejection(parts: Parts, ejection: EjectionConfig) -> AppConfig:
    return parts.config.model_copy(update={"routing": parts.config.routing.model_copy(update={"ejection": ejection})})


def test_a_late_first_byte_asks_the_fleet_once(parts: Parts) -> None:
    config = with_ejection(parts, EjectionConfig(first_byte_check_s=0.05))
    asked: list[str] = []
    dispatcher = Dispatcher(config, {"fast": FakeBackend([[HANG]])}, None, ejector=Ejector(["fast"]),
                            late_first_byte=asked.append)
    slow = Candidate("tier", "fast", "fast", "model:fast", max_wait_s=0.2)
    with pytest.raises(APIError) as err:
        asyncio.run(dispatcher.dispatch(Decision("tier", "fast", "r", (slow,)), STREAM, ticket(parts)))
    assert err.value.status == 503 and "did not answer within 0.2s" in err.value.message
    assert asked == ["fast"]


def test_ejection_off_leaves_the_dispatcher_as_before(parts: Parts) -> None:
    config = with_ejection(parts, EjectionConfig(enabled=False))
    ejector = Ejector(["fast"], threshold=1)
    dispatcher = Dispatcher(config, {"fast": FakeBackend([ActorDiedError()])}, FakeBackend([ok()]), ejector=ejector)
    asyncio.run(dispatcher.dispatch(BOTH, CHAT, ticket(parts)))
    assert ejector.reason("fast") is None


# -- the router --------------------------------------------------------------------------------------------


def router_config(providers: bool):  # type: ignore[no-untyped-def]
    doc = {"tiers": {"coder": {"served_name": "c", "model": TINY}}}
    if providers:
        doc["providers"] = [{"name": "peer", "kind": "vllm", "base_url": "http://127.0.0.1:9/v1",
                             "models": {"coder": "m"}}]
    return build_config(doc, None)


def test_the_router_skips_an_ejected_tier_and_says_why() -> None:
    ejected = {"coder": TierState(healthy_replicas=1, ejected="replica died")}
    d = Router(router_config(True)).route(RequestFacts(model="coder"), ejected)
    assert [c.name for c in d.candidates] == ["peer"]
    assert d.reason == "model:coder;tier coder ejected (replica died)->provider:peer"
    assert ("tier:coder", "ejected (replica died)") in d.skipped
    alone = Router(router_config(False)).route(RequestFacts(model="coder"), ejected)
    assert alone.kind == "reject" and alone.status == 503 and alone.retry_after_s is not None
    assert "ejected (replica died)" in alone.error().message


# -- the fleet ---------------------------------------------------------------------------------------------


class Probed:
    """A tier backend whose probe succeeds or fails as told."""

    def __init__(self) -> None:
        self.works = False
        self.probes = 0

    async def probe(self) -> float:
        self.probes += 1
        if not self.works:
            raise RuntimeError("no replica")
        return 0.01


def test_the_fleet_ejects_a_tier_left_without_replicas_and_a_passing_probe_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.gateway import fleet as fleet_module

    config = build_config({"tiers": {"coder": {"served_name": "c", "model": TINY},
                                     "lazy": {"served_name": "l", "model": TINY, "replicas": {"min": 0, "max": 1}}}},
                          None)
    backend = Probed()
    ejector = Ejector(config.tiers)
    fleet = Fleet(config, {"coder": backend}, "app", ejector=ejector)  # type: ignore[dict-item]
    current = {"coder": {"RUNNING": 1}, "lazy": {}}
    monkeypatch.setattr(fleet_module, "controller_replica_states",
                        lambda app: {deployment_name(t): s for t, s in current.items()})
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)

    async def run() -> None:
        await fleet.refresh_replicas()
        assert ejector.ejected() == []  # `lazy` is scaled to zero: cold, not broken
        current["coder"] = {"STARTING": 1}
        await fleet.refresh_replicas()
        assert ejector.reason("coder") == "no running replica"
        assert fleet.tier_states(metrics)["coder"].ejected == "no running replica"
        fleet.export_readiness(metrics)
        assert registry.get_sample_value("tierserve_tier_ready", {"tier": "coder"}) == 0
        fleet.probe_ejected()
        fleet.probe_ejected()  # one probe at a time
        await asyncio.sleep(0.01)
        assert backend.probes == 1 and ejector.reason("coder") is not None
        backend.works = True
        fleet.probe_ejected()
        await asyncio.sleep(0.01)
        assert ejector.reason("coder") is not None  # it generated, but the controller counts no RUNNING replica
        current["coder"] = {"RUNNING": 1}
        fleet.probe_ejected()
        await asyncio.sleep(0.01)
        assert ejector.reason("coder") is None and backend.probes == 3
        fleet.export_readiness(metrics)
        assert registry.get_sample_value("tierserve_tier_ready", {"tier": "coder"}) == 1

    asyncio.run(run())


def test_a_passing_readiness_probe_restores_an_ejected_tier_at_once() -> None:
    """Ready and routed never disagree: /health/ready finding the tier generating (with a RUNNING replica)
    puts it back in routing, without waiting for the fleet's own probe."""
    from serving.gateway.readiness import ReadinessProber

    config = build_config({"tiers": {"coder": {"served_name": "c", "model": TINY}}}, None)
    ejector = Ejector(config.tiers)
    fleet = Fleet(config, {}, "app", ejector=ejector)
    fleet.replicas = {"coder": 1}
    ejector.eject("coder", "replica died")

    async def probe(tier: str) -> float:
        return 0.01

    async def running(tier: str) -> int:
        return 1

    prober = ReadinessProber(probe=probe, running_replicas=running, scale_to_zero={"coder": False},
                             passed=fleet.probe_passed)
    assert asyncio.run(prober.check("coder")).state == "ready"
    assert ejector.reason("coder") is None


def test_a_late_first_byte_makes_the_fleet_re_read_the_controller_and_eject(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.gateway import fleet as fleet_module

    config = build_config({"tiers": {"coder": {"served_name": "c", "model": TINY}}}, None)
    ejector = Ejector(config.tiers)
    fleet = Fleet(config, {}, "app", ejector=ejector)
    reads: list[int] = []

    def status(app: str) -> dict[str, dict[str, int]]:
        reads.append(1)
        return {deployment_name("coder"): {"STARTING": 1}}  # the replica died; no replacement up yet

    monkeypatch.setattr(fleet_module, "controller_replica_states", status)

    async def run() -> None:
        fleet.first_byte_late("coder")
        fleet.first_byte_late("coder")  # one read in flight at a time
        assert fleet.recounting is not None
        await fleet.recounting
        await asyncio.sleep(0)
        assert fleet.recounting is None and len(reads) == 1
        assert ejector.reason("coder") == "no running replica" and not fleet.settled
        fleet.first_byte_late("coder")  # already ejected: nothing more to read
        assert fleet.recounting is None

    asyncio.run(run())
