"""What the tier replicas report about themselves: replica counts, engine metrics, GPU readings.

Fan-outs never wake a tier that is scaled to zero (a call through its handle would start a replica), and
never wait on a tier longer than FANOUT_TIMEOUT_S. A call reaches one replica per tier; with several
replicas per tier, Ray's own metrics endpoint (deployments/monitoring/prometheus.yml) has every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client.core import Metric

from serving.config import AppConfig, deployment_name
from serving.gateway.ejection import NO_RUNNING_REPLICA, Ejector
from serving.gateway.router import TierState
from serving.ops.gpu import GpuSnapshot
from serving.ops.metrics import RequestMetrics, estimate_wait_s, relabel, waiting_in
from serving.wire.backend import TierBackend
from serving.wire.items import ProviderState

log = logging.getLogger(__name__)


class Running(Protocol):
    def running(self) -> int: ...

FANOUT_TIMEOUT_S = 5.0
STATE_TTL_S = 1.0  # provider states, and replica counts while replicas change, are at most this old
# Replica counts when every replica is RUNNING: steady state needs them rarely, and a failed tier call or a
# changing replica set polls every second.
STABLE_REPLICAS_TTL_S = 10.0
ENGINE_STATS_EVERY = 5  # refreshes between reads of the engines' waiting counts


class Fleet:
    def __init__(
        self, config: AppConfig, tiers: Mapping[str, TierBackend], app_name: str,
        local: Mapping[str, Running] | None = None,
        ejector: Ejector | None = None,
    ) -> None:
        self.config = config
        self.tiers = tiers
        # Tiers out of routing because a replica died, until a probe through their backend generates again.
        self.ejector = ejector if config.routing.ejection.enabled else None
        self.probing: dict[str, asyncio.Task[None]] = {}
        # Tiers whose engine is in this process (ingress.embed_tier): counted here, not by the controller.
        self.local = dict(local or {})
        self.app_name = app_name
        self.engine_families: list[Metric] = []
        self.gpu_snapshots: list[GpuSnapshot] = []
        # What the router reads on every request: refreshed in the background, never awaited on the hot path.
        self.replicas: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.providers: dict[str, ProviderState] = {}
        self.fallback: Any = None
        self.refreshing: asyncio.Task[None] | None = None
        self.settled = False  # every tier's replicas RUNNING at the last read
        self.recounting: asyncio.Task[int | None] | None = None
        self.replicas_read_at = -float("inf")  # loop time of that read

    def tier_states(self, metrics: RequestMetrics) -> dict[str, TierState]:
        out = {}
        for name, tier in self.config.tiers.items():
            running = self.replicas.get(name)  # None until the first refresh: assumed available
            ongoing = metrics.ongoing.get(name, 0)
            out[name] = TierState(
                healthy_replicas=running,
                ongoing=ongoing,
                engine_waiting=self.waiting.get(name),
                est_wait_s=estimate_wait_s(ongoing, running, tier.engine.max_num_seqs,
                                           metrics.mean_duration_s.get(name)),
                cold=tier.replicas.min == 0 and running == 0,
                ejected=self.ejector.reason(name) if self.ejector is not None else None,
            )
        return out

    def provider_states(self) -> dict[str, ProviderState]:
        return self.providers

    def start_refresher(self, fallback: Any, metrics: RequestMetrics) -> None:
        """Keep the router's view (replica counts, provider states) at most STATE_TTL_S old, whatever the
        traffic: a replica that died is out of the candidates within a second. vLLM's waiting counts, a call
        per tier, every ENGINE_STATS_EVERY refreshes."""
        self.fallback = fallback
        if self.refreshing is None:
            self.refreshing = asyncio.get_running_loop().create_task(self._refresh_loop(metrics))

    async def _refresh_loop(self, metrics: RequestMetrics) -> None:
        rounds = 0
        while True:
            await self.refresh_states()
            self.probe_ejected()
            if rounds % ENGINE_STATS_EVERY == 0:
                try:
                    await self.refresh_waiting(metrics)
                except Exception as exc:  # a tier mid-restart: keep the last counts, try again later
                    log.debug("engine stats unavailable: %s", exc)
            rounds += 1
            await asyncio.sleep(STATE_TTL_S)

    def refresh_soon(self, replicas: bool = False) -> None:
        """A provider call just changed breaker or budget state, or (`replicas`) a tier call failed: don't let
        the router act on the old view."""
        if replicas:
            self.settled = False  # and poll replica counts every second until they settle again
        if self.refreshing is not None:
            asyncio.get_running_loop().create_task(self.refresh_states(replicas))

    async def refresh_states(self, replicas: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if replicas or not self.settled or now - self.replicas_read_at >= STABLE_REPLICAS_TTL_S:
            await self.refresh_replicas()
        if self.fallback is not None:
            try:
                self.providers = await asyncio.wait_for(self.fallback.states.remote(), FANOUT_TIMEOUT_S)
            except Exception as exc:
                log.warning("provider states unavailable: %s", exc)

    async def refresh_replicas(self) -> None:
        local = {name: tier.running() for name, tier in self.local.items()}
        remote = [name for name in self.config.tiers if name not in local]
        states: dict[str, dict[str, int]] = {}
        try:
            if remote:
                deployments = await self._replica_states()
                states = {name: deployments[deployment_name(name)] for name in remote}
        except Exception as exc:  # the controller is busy or restarting: keep the last known counts
            log.debug("replica counts unavailable: %s", exc)
            self.replicas.update(local)
            self.settled = False
            return
        self.replicas = {**{name: int(s.get("RUNNING", 0)) for name, s in states.items()}, **local}
        self.settled = all(state == "RUNNING" or not n for s in states.values() for state, n in s.items())
        self.replicas_read_at = asyncio.get_running_loop().time()
        if self.ejector is not None:
            for name, running in self.replicas.items():
                if running == 0 and not self.scales_to_zero(name):  # scaled to zero is cold, not broken
                    self.ejector.eject(name, NO_RUNNING_REPLICA)

    def first_byte_late(self, tier: str) -> None:
        """A tier's first byte is late: re-read the controller now (at most one read in flight), so a tier left
        without a running replica is ejected and its waiting requests go elsewhere."""
        if self.ejector is None or self.ejector.reason(tier) is not None or self.recounting is not None:
            return
        self.recounting = asyncio.get_running_loop().create_task(self.recount(tier))
        self.recounting.add_done_callback(self._recounted)

    def _recounted(self, _: asyncio.Task[int | None]) -> None:
        self.recounting = None

    def probe_ejected(self) -> None:
        """One probe at a time per ejected tier, through its backend (the replacement's, once Ray has one)."""
        if self.ejector is None:
            return
        for tier in self.ejector.ejected():
            if tier not in self.probing:
                self.probing[tier] = asyncio.get_running_loop().create_task(self._try_restore(tier))

    def probe_passed(self, tier: str) -> None:
        """A readiness probe generated on the tier and the controller counts a RUNNING replica: back in routing
        now (not at the next probe of the fleet's own), so ready and routed never disagree."""
        if self.ejector is not None and self.replicas.get(tier):
            self.ejector.restore(tier)

    async def _try_restore(self, tier: str) -> None:
        assert self.ejector is not None
        try:
            await asyncio.wait_for(self.tiers[tier].probe(), self.config.routing.ejection.probe_timeout_s)
            # It generated; back in routing once the controller counts a RUNNING replica too, or the router
            # would still see none.
            if await self.recount(tier):
                self.ejector.restore(tier)
        except Exception as exc:
            log.debug("tier %s: probe while ejected failed: %r", tier, exc)
        finally:
            del self.probing[tier]

    async def _replica_states(self) -> dict[str, dict[str, int]]:
        """The controller's replica states of this app, bounded: a controller that never answers must not stall
        the refresher or a health check (the thread is left behind)."""
        return await asyncio.wait_for(asyncio.to_thread(controller_replica_states, self.app_name), FANOUT_TIMEOUT_S)

    async def recount(self, tier: str) -> int | None:
        """Replica counts read from the controller now (the router's view included), and again every refresh
        until they settle: called when a probe finds a tier changed (failing, or a replica not yet counted),
        which the controller may not have seen yet."""
        await self.refresh_replicas()
        self.settled = False
        return self.replicas.get(tier)

    def scales_to_zero(self, tier: str) -> bool:
        return self.config.tiers[tier].replicas.min == 0

    async def running_replicas(self, tier: str) -> int | None:
        """RUNNING replicas of a tier according to the Serve controller (None if it can't be asked); the
        refresher's count when it runs, so health checks and fan-outs add no controller calls."""
        if tier in self.local:
            return self.local[tier].running()
        if tier in self.replicas:
            return self.replicas[tier]
        try:
            states = (await self._replica_states())[deployment_name(tier)]
        except Exception:
            return None
        return int(states.get("RUNNING", 0))

    async def awake_tiers(self) -> list[str]:
        names = list(self.config.tiers)
        cold = [t for t in names if self.scales_to_zero(t)]
        counts = dict(zip(cold, await asyncio.gather(*(self.running_replicas(t) for t in cold)), strict=True))
        return [t for t in names if t not in counts or counts[t]]

    async def fanout(self, method: str) -> dict[str, Any]:
        tiers = await self.awake_tiers()
        calls = [asyncio.wait_for(getattr(self.tiers[t], method)(), FANOUT_TIMEOUT_S) for t in tiers]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return {t: r for t, r in zip(tiers, results, strict=True) if not isinstance(r, BaseException)}

    async def each_replica(self, method: str) -> dict[str, dict[str, Any]]:
        """{tier: {replica id: reading}} of every awake tier's running replicas: one call per replica, the i-th
        by id (a ReplicaPick, which the tiers' request router sends there), one after the other within a tier
        so that each is routed on its own, the tiers at once. A call that fails or times out is left out."""
        tiers = await self.awake_tiers()

        async def read(tier: str) -> dict[str, Any]:
            found: dict[str, Any] = {}
            for index in range(max(1, self.replicas.get(tier) or 1)):
                with contextlib.suppress(Exception):
                    replica, reading = await asyncio.wait_for(getattr(self.tiers[tier], method)(index),
                                                              FANOUT_TIMEOUT_S)
                    found[replica] = reading
            return found

        readings = await asyncio.gather(*(read(t) for t in tiers))
        return {t: r for t, r in zip(tiers, readings, strict=True) if r}

    async def refresh_waiting(self, metrics: RequestMetrics) -> None:
        """vLLM's queue per tier, summed over its replicas, for the router."""
        for tier, per_replica in (await self.each_replica("waiting")).items():
            self._set_waiting(tier, sum(per_replica.values()), metrics)

    async def refresh_engine_metrics(self, metrics: RequestMetrics) -> None:
        """All of vLLM's metrics of every replica, relabelled with tier and replica (at scrape time: writing and
        parsing the text costs)."""
        families: list[Metric] = []
        for tier, texts in (await self.each_replica("engine_metrics")).items():
            mine = [family for replica, text in texts.items()
                    for family in relabel(text, {"tier": tier, "replica": replica})]
            self._set_waiting(tier, waiting_in(mine), metrics)
            families.extend(mine)
        self.engine_families = families

    def export_readiness(self, metrics: RequestMetrics) -> None:
        """tierserve_tier_ready from the router's view (replica counts, ejection): what an alert on a tier with
        nowhere to run reads."""
        for tier in self.config.tiers:
            running = self.replicas.get(tier)
            ejected = self.ejector is not None and self.ejector.reason(tier) is not None
            if running is not None:  # unknown before the first read: no sample rather than a guess
                ready = not ejected and (running > 0 or self.scales_to_zero(tier))
                metrics.tier_ready.labels(tier).set(1 if ready else 0)

    def _set_waiting(self, tier: str, waiting: int, metrics: RequestMetrics) -> None:
        self.waiting[tier] = waiting
        metrics.queue_depth.labels(tier).set(waiting)

    async def refresh_gpus(self) -> list[GpuSnapshot]:
        """One snapshot per node; the processes of tiers sharing a node are merged into it."""
        by_node: dict[str, GpuSnapshot] = {}
        for raw in (await self.fanout("gpu_snapshot")).values():
            snap = GpuSnapshot.from_dict(raw)
            by_node[snap.node] = by_node[snap.node].merge(snap) if snap.node in by_node else snap
        self.gpu_snapshots = list(by_node.values())
        return self.gpu_snapshots


def controller_replica_states(app_name: str) -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} of one application, from the Serve controller's details as plain
    data: what serve.status() reports, without rebuilding Serve's pydantic schema on the caller's side, whose
    RequestRouterConfig cloudpickles the router class on every call, walking all of sys.modules for each
    function it pickles. With vLLM imported (an embedded tier) that was 8.5 % of the ingress's CPU under load,
    polled every 10 s (yappi, benchmarks/results/2026-11-30-vm-2cpu-ingress-profile.md). Raises KeyError
    when the application is not (or no longer) deployed."""
    from ray.serve.context import _get_global_client  # serve.status()'s own way to the controller

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise KeyError(app_name)
    deployments = client.get_serve_details().get("applications", {})[app_name].get("deployments", {})
    return {name: dict(Counter(r["state"] for r in d.get("replicas", []))) for name, d in deployments.items()}


class ListCollector:
    """A prometheus_client collector exporting whatever families a callable returns at scrape time."""

    def __init__(self, families: Any) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families())
