"""The playbook applied for real to two booted Debian containers joined by a network this test builds.

site.yml (common, nvidia, wireguard, firewall, agent_vm; the tierserve role is off: no vLLM in the
containers) runs over SSH from a controller namespace, exactly as against VMs. A stand-in HTTP server
listens on the GPU node's ingress port on every interface. Then: a chat completion from the agent goes
through the tunnel, the same port is unreachable from a third namespace that is not a peer (and from the
agent outside the tunnel), and a second run of the playbook changes nothing. Needs root and the tools in
REQUIREMENTS.md; it fails (never skips) without them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ansible_lab as lab
import pytest
from ansible_tools import ANSIBLE_DIR, ansible_env, run_tool, tool

HERE = Path(__file__).resolve().parent
GPU_WG, AGENT_WG = "10.66.0.1", "10.66.0.11"
PORT = 8000
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
        self.lab = lab.Lab(workdir)
        self.workdir = workdir
        self.api_key = "sk-agent-" + secrets.token_hex(16)
        self.timings: dict[str, float] = {}
        self.outputs: dict[str, str] = {}
        self.rcs: dict[str, int] = {}
        self.earlier_failure: str | None = None  # a first lab's failure, when this is the retry
        # ssh's ControlPath must stay under the 108-byte socket path limit.
        self.cp_dir = Path(tempfile.mkdtemp(prefix="tscp-", dir="/tmp"))

    def inventory(self) -> Path:
        common = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.lab.key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            # The containers have no route to a mirror: everything is preinstalled (lab.PACKAGES).
            "common_apt_update_cache": False,
            # No WireGuard kernel module here: wg-quick falls back to wireguard-go.
            "wireguard_userspace": True,
            # No vLLM in the containers; the stand-in serves the ingress port instead.
            "tierserve_app_enabled": False,
        }
        inv = {
            "all": {
                "vars": common,
                "children": {
                    "gpu_nodes": {"hosts": {"gpu": {"ansible_host": lab.HOSTS["gpu"], "wireguard_address": GPU_WG}}},
                    "agents": {
                        "hosts": {
                            "agent": {
                                "ansible_host": lab.HOSTS["agt"],
                                "wireguard_address": AGENT_WG,
                                "agent_vm_api_key": self.api_key,
                            }
                        }
                    },
                },
            }
        }
        path = self.workdir / "hosts.yml"
        path.write_text(json.dumps(inv, indent=2))
        return path

    def playbook(self, label: str, playbook: Path, inventory: Path, *extra: str) -> str:
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
            timeout=900,
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
        self.playbook("standin", HERE / "standin" / "standin.yml", inventory)
        assert self.rcs["standin"] == 0, failures(self.outputs["standin"])
        self.playbook("first", ANSIBLE_DIR / "site.yml", inventory)
        assert self.rcs["first"] == 0, failures(self.outputs["first"])
        self.playbook("second", ANSIBLE_DIR / "site.yml", inventory)

    def report(self) -> dict:
        return {
            "timings_s": self.timings,
            "second_run_recap": recap(self.outputs.get("second", "")),
            "first_run_recap": recap(self.outputs.get("first", "")),
            "earlier_failure": self.earlier_failure,
        }

    def teardown(self) -> None:
        try:
            self.lab.stop(keep_logs=lab.CACHE / "last-run")
        finally:
            shutil.rmtree(self.cp_dir, ignore_errors=True)


def finish(run: Run) -> None:
    report = run.report()
    print("\n[tierserve ansible real run]", json.dumps(report))
    (lab.CACHE / "last-run.json").write_text(json.dumps(report, indent=2))
    run.teardown()
    shutil.rmtree(run.workdir, ignore_errors=True)
    assert lab.free_of_leftovers(run.lab.tag), f"namespaces or links of {run.lab.tag} left behind"


@pytest.fixture(scope="module")
def applied():
    if os.geteuid() != 0:
        pytest.fail("the real Ansible run needs root (network namespaces, systemd-nspawn)", pytrace=False)
    for name in ("ip", "systemd-nspawn", "debootstrap", "ssh", "ssh-keygen"):
        tool(name)
    workdir_root = lab.CACHE / "runs"
    workdir_root.mkdir(parents=True, exist_ok=True)
    run = Run(Path(tempfile.mkdtemp(prefix="run-", dir=workdir_root)))
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
            run = Run(Path(tempfile.mkdtemp(prefix="run-", dir=workdir_root)))
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
    r = urllib.request.urlopen(req, timeout=10)
except urllib.error.HTTPError as e:
    r = e
print(json.dumps({{"status": r.status, "headers": dict(r.headers), "body": json.loads(r.read() or b"null")}}))
"""
    proc = run.lab.nsexec(src, sys.executable, "-c", script, timeout=30)
    out = json.loads(proc.stdout)
    return out["status"], out["headers"], out["body"]


def test_first_run_bootstraps_both_hosts(applied: Run) -> None:
    result = recap(applied.outputs["first"])
    assert set(result) == {"gpu", "agent"}, applied.outputs["first"][-3000:]
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in result.values()), result
    assert all(r["changed"] > 0 for r in result.values()), result


def test_second_run_changes_nothing(applied: Run) -> None:
    assert applied.rcs["second"] == 0, failures(applied.outputs["second"])
    result = recap(applied.outputs["second"])
    assert set(result) == {"gpu", "agent"}, applied.outputs["second"][-3000:]
    changed = {host: r["changed"] for host, r in result.items()}
    assert changed == {"gpu": 0, "agent": 0}, applied.outputs["second"][-6000:]


def test_agent_smoke_request_ran_through_the_tunnel(applied: Run) -> None:
    out = applied.outputs["first"]
    assert f"via http://{GPU_WG}:{PORT}/v1" in out, out[-4000:]
    assert 'answered \\"ready\\"' in out or 'answered "ready"' in out, out[-4000:]


def test_chat_completion_from_agent_through_wireguard(applied: Run) -> None:
    body = {"model": "tiny-fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, headers, payload = http(applied, "agt", "/v1/chat/completions", applied.api_key, body)
    assert status == 200, payload
    assert payload["choices"][0]["message"]["content"] == "ready"
    # The server saw the agent's WireGuard address: the request came through the tunnel.
    assert headers["X-Peer"] == AGENT_WG


def test_ingress_checks_the_key(applied: Run) -> None:
    status, _, payload = http(applied, "agt", "/v1/models", "sk-wrong")
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"


def test_ingress_unreachable_from_non_peer(applied: Run) -> None:
    gpu = lab.HOSTS["gpu"]
    # Control: the outsider reaches the GPU node at all (SSH is open to it) ...
    assert applied.lab.tcp_open("out", gpu, 22)
    # ... but not its ingress, although the stand-in listens on every interface.
    assert not applied.lab.tcp_open("out", gpu, PORT)
    # The agent itself only reaches it through the tunnel, not over the underlay.
    assert not applied.lab.tcp_open("agt", gpu, PORT)
    assert applied.lab.tcp_open("agt", GPU_WG, PORT)


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
    for host in ("gpu", "agt"):
        out = applied.lab.ssh(host, "systemctl is-enabled wg-quick@wg0 nftables", check=False).stdout.split()
        assert out == ["enabled", "enabled"], (host, out)


def test_nvidia_role_skipped_without_gpu(applied: Run) -> None:
    assert "No NVIDIA GPU on gpu: the nvidia role skips this host." in applied.outputs["first"]


def test_firewall_is_default_drop(applied: Run) -> None:
    ruleset = applied.lab.ssh("gpu", "nft list table inet tierserve").stdout
    assert "policy drop" in ruleset
    assert re.search(rf'iifname "wg0" ip saddr @ingress_v4 tcp dport {PORT} accept', ruleset), ruleset


def test_peer_change_applies_in_place(applied: Run) -> None:
    """Runs last: a changed peer setting reaches the running tunnel through `wg syncconf`, no restart."""
    pid_before = applied.lab.ssh("agt", "pgrep -f 'wireguard-go wg0'").stdout.split()
    assert len(pid_before) == 1
    out = applied.playbook(
        "peer-change",
        ANSIBLE_DIR / "site.yml",
        applied.workdir / "hosts.yml",
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
    status, headers, _ = http(applied, "agt", "/v1/models", applied.api_key)
    assert status == 200 and headers["X-Peer"] == AGENT_WG
