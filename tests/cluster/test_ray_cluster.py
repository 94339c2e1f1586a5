"""The cluster deployment on a real multi-node Ray cluster (README "Several GPU VMs as one Ray cluster").

Ray's `ray.cluster_utils.Cluster` starts the nodes of deployments/cluster.yaml's header on this machine: the head
advertising `tier_coder`, a worker advertising `tier_reasoning`, and `fast`'s nodes launched on demand by the
head's autoscaler (Ray's fake multi-node provider, with deployments/autoscaler/aws.yaml's `fast` node type). The
app is deployed with `serve deploy` as an operator does; requests go to the head's ingress on 127.0.0.1. Models
are the local profile's tiny CPU ones (profile `cluster-cpu`, tests/support/raycluster.py); each replica takes
one CPU, as it takes its node's GPU on the real cluster, so a node holds one replica.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving.cli import unclaimed_port
from tests.conftest import auth, tierserve_cli
from tests.support.measure import measured
from tests.support.raycluster import (
    AUTOSCALED,
    HEAD,
    PROFILE,
    LocalCluster,
    answer,
    cluster_env,
    poll,
    rehearsal_models,
    running_cluster,
    serve_config,
    served_locally,
    short_tempdir,
)

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

TIERS = ("coder", "reasoning", "fast")
READY_S = 600  # three engines loading at once on 2 cores, behind Ray's start on every node
# `fast` scales 1..2 on one request per replica, quickly both ways (the cluster profile's fast scales to zero
# after 15 minutes: here it keeps one replica, so that the test sees exactly the burst's node go).
AUTOSCALING = {"min": 1, "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 10}
IDLE_TIMEOUT_MINUTES = 0.25  # an idle autoscaled node goes after 15 s


@dataclass
class ClusterApp:
    cluster: LocalCluster
    client: httpx.Client
    ready_s: float


@pytest.fixture(scope="module")
def cluster_app() -> Iterator[ClusterApp]:
    workdir = short_tempdir()
    state = workdir / "state"
    state.mkdir()
    env = cluster_env(workdir, state)
    models = rehearsal_models(workdir, AUTOSCALING)
    try:
        with running_cluster(env, workdir, IDLE_TIMEOUT_MINUTES) as cluster:
            key_out = tierserve_cli("keys", "--config", str(models), "--profile", PROFILE, "create", "--agent",
                                    "cluster", env=cluster.env)
            assert key_out.returncode == 0, key_out.stderr
            key = next(w for w in key_out.stdout.split() if w.startswith("ts_"))
            port = unclaimed_port("127.0.0.1")
            config = serve_config(workdir, models, Path.home() / ".cache" / "tierserve", port)
            start = time.monotonic()
            deployed = cluster.serve("deploy", str(config))
            assert deployed.returncode == 0, deployed.stderr[-2000:]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(key)) as client:
                pending = set(TIERS)

                def all_ready() -> bool:
                    pending.difference_update({t for t in sorted(pending) if served_locally(answer(client, t))})
                    return not pending

                try:
                    poll(all_ready, READY_S, every_s=2)
                except TimeoutError:
                    status = cluster.serve("status")
                    raise AssertionError(f"tiers {sorted(pending)} not serving: {status.stdout[-3000:]}") from None
                ready = time.monotonic() - start
                measured(f"[tierserve cluster] {len(cluster.nodes())} Ray nodes up in {cluster.up_s:.1f}s; "
                         f"serve deploy to every tier answering through the head: {ready:.1f}s")
                yield ClusterApp(cluster, client, ready)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_each_tier_runs_on_the_node_with_its_resource_and_answers_through_the_head(cluster_app: ClusterApp) -> None:
    placed = cluster_app.cluster.replicas()
    summary = {}
    for tier in TIERS:
        nodes = placed.get(f"tier-{tier}", [])
        assert len(nodes) == 1, (tier, placed)
        assert nodes[0].get(f"tier_{tier}", 0) >= 1, (tier, nodes)  # the node advertising the tier's resource
        summary[tier] = sorted(k for k in nodes[0] if k.startswith("tier_") or k == HEAD)
    ingress = placed["ingress"]
    assert len(ingress) == 1 and ingress[0].get(HEAD), ingress  # the gateway on the head
    assert summary["coder"] == [HEAD, "tier_coder"] and HEAD not in summary["reasoning"] + summary["fast"], summary
    for tier in TIERS:
        r = answer(cluster_app.client, tier, max_tokens=4)
        assert served_locally(r), (tier, r and r.text)
        assert r is not None and r.json()["usage"]["completion_tokens"] == 4
    measured(f"[tierserve cluster] placements: {summary}; ingress on the head")


def fast_nodes(app: ClusterApp) -> int:
    return sum(1 for n in app.cluster.nodes() if n.resources_total.get(f"tier_{AUTOSCALED}"))


def test_a_burst_on_the_autoscaled_tier_adds_a_node_for_its_new_replica_and_the_idle_node_goes(
    cluster_app: ClusterApp,
) -> None:
    # The readiness polls can briefly take fast to two replicas (one request per replica), and so two nodes:
    # the test starts from the steady state of one replica on one node.
    at_ready = fast_nodes(cluster_app)
    _, settled_s = poll(lambda: fast_nodes(cluster_app) == 1
                        and len(cluster_app.cluster.replicas().get(f"tier-{AUTOSCALED}", [])) == 1, 300, every_s=2)
    stop = threading.Event()
    failures: list[str] = []
    answered_by: set[str] = set()  # x-tierserve-replica of each answer

    def stream() -> int:
        done = 0
        while not stop.is_set():
            # A new conversation each time, as many agents: one conversation stays on its replica.
            r = answer(cluster_app.client, AUTOSCALED, max_tokens=64, timeout_s=120, session=uuid.uuid4().hex)
            if served_locally(r):
                assert r is not None
                answered_by.add(r.headers.get("x-tierserve-replica", "?"))
            else:
                failures.append(f"{r and r.status_code}: {r and r.text[:200]}")
            done += 1
        return done

    start = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        load = [pool.submit(stream) for _ in range(6)]
        try:
            _, added_s = poll(lambda: fast_nodes(cluster_app) == 2, 300, every_s=2)
            # The new replica can only go to the new node: a fast node holds one replica.
            _, answered_s = poll(lambda: len(answered_by - {"?"}) == 2, 400, every_s=2)
            placed = cluster_app.cluster.replicas().get(f"tier-{AUTOSCALED}", [])
        finally:
            stop.set()
        sent = sum(f.result() for f in load)
    assert len(placed) == 2 and all(n.get(f"tier_{AUTOSCALED}") for n in placed), placed
    assert not failures, failures[:5]
    idle_from = time.monotonic()
    _, released_s = poll(lambda: fast_nodes(cluster_app) < 2, 300, every_s=2)
    measured(f"[tierserve cluster] {AUTOSCALED} nodes when every tier first answered: {at_ready}; one node, one "
             f"replica {settled_s:.0f}s later")
    measured(f"[tierserve cluster] burst of 6 clients on {AUTOSCALED}: a second node after {added_s:.1f}s, its "
             f"replica answering after {added_s + answered_s:.1f}s ({time.monotonic() - start:.0f}s of load, "
             f"{sent} requests, none failed); after the load the idle node was released in {released_s:.1f}s "
             f"(downscale delay {AUTOSCALING['downscale_delay_s']}s, idle timeout "
             f"{IDLE_TIMEOUT_MINUTES * 60:.0f}s); {fast_nodes(cluster_app)} fast node(s) "
             f"{time.monotonic() - idle_from:.0f}s after the load")


def test_a_killed_worker_node_sends_its_tier_to_503_with_retry_after_and_it_recovers_when_the_node_rejoins(
    cluster_app: ClusterApp,
) -> None:
    client, cluster = cluster_app.client, cluster_app.cluster
    assert served_locally(answer(client, "reasoning"))
    killed = time.monotonic()
    cluster.kill("reasoning")

    def refused() -> httpx.Response | None:
        r = answer(client, "reasoning", timeout_s=60)
        return r if r is not None and r.status_code == 503 else None

    r, failover_s = poll(refused, 120, every_s=0.5)
    # No provider is configured for reasoning: the client is told to come back, in OpenAI's error shape.
    assert int(r.headers["retry-after"]) > 0, dict(r.headers)
    assert r.json()["error"]["type"] and isinstance(r.json()["error"]["code"], str), r.text
    for tier in ("coder", "fast"):  # the tiers on other nodes keep answering
        other = answer(client, tier, timeout_s=120)
        assert served_locally(other), (tier, other and other.text)
    rejoined = time.monotonic()
    cluster.workers["reasoning"] = cluster.add("reasoning")
    _, recovered_s = poll(lambda: served_locally(answer(client, "reasoning", timeout_s=60)), 420, every_s=2)
    placed = cluster_app.cluster.replicas()["tier-reasoning"]
    assert len(placed) == 1 and placed[0].get("tier_reasoning"), placed
    measured(f"[tierserve cluster] reasoning's worker node killed: 503 with Retry-After {r.headers['retry-after']}s "
             f"after {failover_s:.1f}s (message: {r.json()['error']['message'][:120]}); node rejoined "
             f"{rejoined - killed:.0f}s after the kill; reasoning answering again {recovered_s:.1f}s after it "
             "rejoined")
