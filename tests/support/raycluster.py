"""A multi-node Ray cluster on this machine, for the cluster deployment's tests.

Ray's own `ray.cluster_utils.Cluster` (what Ray's tests use) starts the head and each worker node as raylets
of their own; the head's autoscaler runs on Ray's fake multi-node provider, which "launches" a node of a type
from the autoscaler config as another raylet here. Every Ray address is loopback
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) and the cluster's files live in a directory of its own, so nothing
else on the machine (a `tierserve up`, whose `ray.init` would join a cluster recorded in /tmp/ray) sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from serving.cli import unclaimed_port
from serving.config import deep_merge
from serving.gateway.sessions import SESSION_HEADER

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "cluster-cpu"  # the cluster profile's placement and replicas, with the local profile's tiny CPU models
AUTOSCALED = "fast"  # the tier whose nodes come from the autoscaler; the others have fixed nodes
HEAD = "node:__internal_head__"
# Each tier replica asks for 1 CPU (the cluster profile's default), as on GPU nodes it takes the node's GPU:
# a node type with 1 CPU then holds one replica, and a second replica needs a second node.
FIXED_NODES = {"coder": {"num_cpus": 2, "resources": {"tier_coder": 1}},  # the head: coder and the gateway
               "reasoning": {"num_cpus": 1, "resources": {"tier_reasoning": 1}}}


def cpu_cluster_profile(replicas: dict[str, dict[str, Any]], cpus: float | None = None) -> dict[str, Any]:
    """The `cluster` profile with each tier's model, engine and GPUs swapped for the local profile's tiny CPU
    ones (custom resources and the ingress's head pin kept); `replicas` and `cpus` per tier where given."""
    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    local = data["profiles"]["local"]["tiers"]
    overlay: dict[str, Any] = {"tiers": {}}
    for name in data["profiles"]["cluster"]["tiers"]:
        tiny = local[name]
        resources = {"gpus": 0, "env": tiny["resources"]["env"], **({"cpus": cpus} if cpus else {})}
        overlay["tiers"][name] = {"model": tiny["model"], "resources": resources,
                                  **({"replicas": replicas[name]} if name in replicas else {})}
    profile = deep_merge(data["profiles"]["cluster"], overlay)
    for name, tier in profile["tiers"].items():  # the tiny engine whole: no GPU share, no tensor parallelism
        tier["engine"] = local[name]["engine"]
    return profile


def rehearsal_models(directory: Path, autoscaling: dict[str, Any]) -> Path:
    """models.yaml with profile `cluster-cpu` (`cpu_cluster_profile`), the autoscaled tier scaling by
    `autoscaling`; each replica takes the cluster profile's 1 CPU."""
    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    data["profiles"][PROFILE] = cpu_cluster_profile({AUTOSCALED: autoscaling})
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_autoscaler_config(gcs_address: str, idle_timeout_minutes: float) -> dict[str, Any]:
    """deployments/autoscaler/aws.yaml's node type for the autoscaled tier, on Ray's fake multi-node provider:
    the same resources (the tier's custom resource and CPUs; no GPU here) and worker bounds."""
    aws = yaml.safe_load((ROOT / "deployments" / "autoscaler" / "aws.yaml").read_text())
    node_type = aws["available_node_types"][AUTOSCALED]
    resources = {k: v for k, v in node_type["resources"].items() if k != "GPU"}
    return {
        "cluster_name": "tierserve-rehearsal",
        "max_workers": node_type["max_workers"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "upscaling_speed": 1.0,
        # As Ray's fake_multi_node/example.yaml: every node here has the same address, so the autoscaler knows
        # them by node id; the provider's nodes are raylets started ready, with nothing for an updater to run.
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            AUTOSCALED: {"resources": resources, "node_config": {}, "min_workers": node_type["min_workers"],
                         "max_workers": node_type["max_workers"]},
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def serve_config(directory: Path, models: Path, cache_dir: Path, port: int) -> Path:
    """deployments/cluster.yaml with this run's values filled in, as the Ansible role renders it."""
    doc = yaml.safe_load((ROOT / "deployments" / "cluster.yaml").read_text())
    doc["http_options"] = {**doc.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in doc["applications"]:
        if app["import_path"] == "serving.app:build_app":
            app["args"] = {"config": str(models), "profile": PROFILE, "cache_dir": str(cache_dir)}
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class LocalCluster:
    """Head (with the dashboard for `serve deploy`, and the autoscaler) plus fixed worker nodes."""

    def __init__(self, workdir: Path, env: dict[str, str], idle_timeout_minutes: float) -> None:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
        from ray.cluster_utils import Cluster

        self.env = env
        self.dashboard_port, gcs_port = unclaimed_port("127.0.0.1"), unclaimed_port("127.0.0.1")
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        autoscaler = workdir / "autoscaler.yaml"
        autoscaler.write_text(json.dumps(fake_autoscaler_config(self.gcs_address, idle_timeout_minutes)))
        head = FIXED_NODES["coder"]
        start = time.monotonic()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **head, "node_ip_address": "127.0.0.1", "gcs_server_port": gcs_port, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
            "autoscaling_config": str(autoscaler),
            # The provider knows the head by this id (`ray start --fixed-head-id` in Ray's recipe).
            "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}})
        self.workers = {tier: self.add(tier) for tier in FIXED_NODES if tier != "coder"}
        self.cluster.wait_for_nodes()
        self.up_s = time.monotonic() - start

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add(self, tier: str) -> Any:
        return self.cluster.add_node(node_ip_address="127.0.0.1", **FIXED_NODES[tier])

    def kill(self, tier: str) -> None:
        """Every process of the node holding `tier`'s fixed resource, at once (no graceful shutdown)."""
        self.cluster.remove_node(self.workers.pop(tier), allow_graceful=False)

    def serve(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("serve")), *args, "--address", self.dashboard],
                              env=self.env, capture_output=True, text=True, timeout=300)

    def nodes(self) -> list[Any]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, detail=True) if n.state == "ALIVE"]

    def replicas(self) -> dict[str, list[dict[str, float]]]:
        """Each deployment's live replicas, as the resources of the node each one runs on."""
        from ray.util.state import list_actors

        totals = {n.node_id: n.resources_total for n in self.nodes()}
        found: dict[str, list[dict[str, float]]] = {}
        for actor in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True,
                                 limit=1000):
            prefix = "ServeReplica:tierserve:"
            if actor.class_name.startswith(prefix) and actor.node_id in totals:
                found.setdefault(actor.class_name.removeprefix(prefix), []).append(totals[actor.node_id])
        return found

    def shutdown(self) -> None:
        self.cluster.shutdown()


def cluster_env(workdir: Path, state_dir: Path) -> dict[str, str]:
    """What the Ansible env file gives every node's Ray, plus this machine's loopback-only cluster."""
    return {
        "RAY_TMPDIR": str(workdir),  # the cluster's address file and sessions stay in here
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node's address is 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_FAKE_CLUSTER": "1",  # the fake multi-node provider refuses to run without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "TIERSERVE_STATE_DIR": str(state_dir),
        "PYTHONUNBUFFERED": "1",
    }


def cluster_processes(workdir: Path) -> list[psutil.Process]:
    """Every process of the cluster, found by the RAY_TMPDIR they all inherit: the autoscaler's nodes are
    children of its monitor and an engine outlives its parent raylet, so the test's process tree misses some."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == str(workdir):
                found.append(proc)
    return found


@contextlib.contextmanager
def running_cluster(env: dict[str, str], workdir: Path, idle_timeout_minutes: float) -> Iterator[LocalCluster]:
    """The cluster's processes inherit the test's environment; afterwards none of them is left."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        cluster = LocalCluster(workdir, {**os.environ}, idle_timeout_minutes)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        for proc in cluster_processes(workdir):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _, alive = psutil.wait_procs(cluster_processes(workdir), timeout=10)
        assert not alive, f"cluster processes left: {[p.pid for p in alive]}"


def short_tempdir() -> Path:
    """Ray's Unix sockets live under its session directory: a pytest tmp_path can make them too long."""
    return Path(tempfile.mkdtemp(prefix="tsr", dir="/tmp"))


def poll(predicate: Callable[[], Any], timeout_s: float, every_s: float = 1.0) -> tuple[Any, float]:
    """(the first truthy value, seconds it took); TimeoutError past the deadline."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not true after {timeout_s:.0f}s")
        time.sleep(every_s)


def answer(client: httpx.Client, tier: str, max_tokens: int = 2, timeout_s: float = 30,
           session: str | None = None) -> httpx.Response | None:
    """One completion for `tier`; None when the connection failed or timed out. `session` names the
    conversation (`x-session-id`), which keeps to one replica of the tier while it can."""
    headers = {SESSION_HEADER: session} if session else {}
    try:
        return client.post("/v1/completions", json={"model": tier, "prompt": "hi", "max_tokens": max_tokens},
                           headers=headers, timeout=timeout_s)
    except httpx.HTTPError:
        return None


def served_locally(r: httpx.Response | None) -> bool:
    return r is not None and r.status_code == 200 and r.headers.get("x-tierserve-provider") == "local"
