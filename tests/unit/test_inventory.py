"""`tierserve inventory --from-tofu`: deployments/tfgrid's outputs -> the inventory ansible/site.yml reads.

The fixture is a `tofu output -json` document of that configuration: a GPU VM and three agent VMs (one with a
public IPv4) with Mycelium IPv6 addresses. The generated inventory is compared with the hand-written TFGrid
example inventory and evaluated by ansible-playbook with the playbook's group variables.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.cli import main
from serving.ops.inventory import InventoryError, inventory_from_tofu, render_inventory, write_inventory

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
FIXTURE = REPO / "tests" / "fixtures" / "tfgrid" / "tofu_output.json"
HAND_WRITTEN = ANSIBLE / "inventories" / "tfgrid" / "hosts.yml"


@pytest.fixture
def outputs() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def hosts(inventory: dict[str, Any], group: str) -> dict[str, dict[str, Any]]:
    return inventory["all"]["children"][group]["hosts"]


def test_groups_hosts_and_addresses(outputs: dict[str, Any]) -> None:
    inv = inventory_from_tofu(outputs)
    assert set(inv["all"]["children"]) == {"gpu_nodes", "agents"}
    assert hosts(inv, "gpu_nodes") == {
        "gpu1": {
            "ansible_host": "4a1:2b3c:4d5e:6f70:ff0f:1e2d:3c4b:5a69",
            "wireguard_address": "10.66.0.1",
            "wireguard_endpoint": "4a1:2b3c:4d5e:6f70:ff0f:1e2d:3c4b:5a69",
            "tierserve_ray_role": "standalone",
        }
    }
    agents = hosts(inv, "agents")
    assert list(agents) == ["agent1", "agent2", "agent3"]
    for n, (name, host) in enumerate(agents.items(), start=1):
        mycelium = outputs["agent_vms"]["value"][name]["mycelium_ip"]
        assert host == {"ansible_host": mycelium, "wireguard_address": f"10.66.0.{10 + n}",
                        "wireguard_endpoint": mycelium, "agent_vm_name": name}  # fmt: skip
    assert inv["all"]["vars"] == {
        "ansible_user": "root",
        "firewall_extra_tcp_ports": [9651],
        "firewall_extra_udp_ports": [9651],
        "wireguard_mtu": 1320,
        "tierserve_profile": "gpu",
    }


def test_wireguard_addresses_are_stable_for_the_same_names(outputs: dict[str, Any]) -> None:
    before = {n: h["wireguard_address"] for n, h in hosts(inventory_from_tofu(outputs), "agents").items()}
    fewer = copy.deepcopy(outputs)
    del fewer["agent_vms"]["value"]["agent2"]
    more = copy.deepcopy(outputs)
    vms = more["agent_vms"]["value"]
    vms["agent10"] = vms["agent3"] | {"name": "agent10", "mycelium_ip": "5b2:3c4d:5e6f:7081:ff0f:1:2:3"}
    more["agent_vms"]["value"] = dict(reversed(list(vms.items())))  # input order does not matter
    after_removal = {n: h["wireguard_address"] for n, h in hosts(inventory_from_tofu(fewer), "agents").items()}
    after_growth = {n: h["wireguard_address"] for n, h in hosts(inventory_from_tofu(more), "agents").items()}
    assert after_removal == {"agent1": before["agent1"], "agent3": before["agent3"]}
    assert after_growth == before | {"agent10": "10.66.0.20"}
    assert list(after_growth) == ["agent1", "agent2", "agent3", "agent10"]
    assert inventory_from_tofu(outputs) == inventory_from_tofu(json.loads(FIXTURE.read_text()))


def test_same_variables_as_the_hand_written_tfgrid_inventory(outputs: dict[str, Any]) -> None:
    inv = inventory_from_tofu(outputs)
    example = yaml.safe_load(HAND_WRITTEN.read_text())
    assert set(inv["all"]["vars"]) == set(example["all"]["vars"]) | {"tierserve_profile"}
    for group in ("gpu_nodes", "agents"):
        wanted = set().union(*(set(h) for h in example["all"]["children"][group]["hosts"].values()))
        for name, host in hosts(inv, group).items():
            assert set(host) == wanted, (group, name)


def test_every_variable_is_one_the_playbook_reads(outputs: dict[str, Any]) -> None:
    """Nothing in the inventory is ignored: each name is an Ansible connection variable or read by a role, a
    template or the group variables."""
    sources = "\n".join(p.read_text() for p in [*ANSIBLE.glob("roles/*/*/*"), *ANSIBLE.glob("group_vars/*.yml")]
                        if p.is_file())  # fmt: skip
    inv = inventory_from_tofu(outputs | {"tierserve_profile": {"value": "local"}})
    names = set(inv["all"]["vars"]).union(*(set(h) for g in ("gpu_nodes", "agents") for h in hosts(inv, g).values()))
    for name in names - {"ansible_host", "ansible_user"}:
        assert re.search(rf"\b{name}\b", sources), f"{name} is read by no role"
    # wireguard_address has no usable default: every host must get one.
    assert all("wireguard_address" in h for g in ("gpu_nodes", "agents") for h in hosts(inv, g).values())


def test_options_and_profiles(outputs: dict[str, Any]) -> None:
    private = inventory_from_tofu(outputs, wireguard_over="private")
    assert hosts(private, "gpu_nodes")["gpu1"]["wireguard_endpoint"] == "10.20.2.2"
    assert hosts(private, "agents")["agent2"]["wireguard_endpoint"] == "10.20.3.3"
    assert hosts(private, "agents")["agent2"]["ansible_host"] == "5b2:3c4d:5e6f:7081:ff0f:7c1:d2e3:f405"
    wide = inventory_from_tofu(outputs, wireguard_subnet="10.80.0.0/16")
    assert wide["all"]["vars"]["wireguard_prefix"] == 16
    assert hosts(wide, "agents")["agent3"]["wireguard_address"] == "10.80.0.13"
    local = inventory_from_tofu(outputs | {"tierserve_profile": {"value": "local"}})
    assert local["all"]["vars"]["tierserve_profile"] == "local"
    assert hosts(local, "gpu_nodes")["gpu1"]["tierserve_engine"] == "cpu"
    no_agents = inventory_from_tofu(outputs | {"agent_vms": {"value": {}}})
    assert hosts(no_agents, "agents") == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("gpu_vm"), "output gpu_vm is missing"),
        (lambda o: o.pop("tierserve_profile"), "output tierserve_profile is missing"),
        (lambda o: o["gpu_vm"]["value"].update(mycelium_ip=""), "gpu_vm.mycelium_ip: '' is not an IPv6"),
        (lambda o: o["gpu_vm"]["value"].update(mycelium_ip="10.1.1.1"), "gpu_vm.mycelium_ip: 10.1.1.1 is not IPv6"),
        (lambda o: o["gpu_vm"]["value"].update(name="gpu-1"), "'gpu-1' is not gpu<N> or agent<N>"),
        (lambda o: o["gpu_vm"]["value"].update(name="gpu11"), "GPU VMs are gpu1..gpu10"),
        (lambda o: o["gpu_vm"]["value"].update(name="agent4"), "a gpu VM's name must be gpu<N>"),
        (lambda o: o["agent_vms"]["value"]["agent1"].update(name="agent9"), "agent_vms.agent1: its name is 'agent9'"),
        (lambda o: o["agent_vms"]["value"].update(agent245=o["agent_vms"]["value"]["agent1"] | {"name": "agent245"}),
         "agent VMs are agent1..agent244"),
        (lambda o: o["agent_vms"]["value"]["agent3"].update(private_ip="10.66.0.7"),
         "agent3: its grid network address 10.66.0.7 is inside the WireGuard subnet"),
        (lambda o: o["agent_vms"]["value"]["agent3"].update(public_ipv4="not-an-ip"), "public_ipv4: 'not-an-ip'"),
    ],
)
def test_bad_outputs_are_refused_with_the_field_named(outputs: dict[str, Any], change: Any, message: str) -> None:
    change(outputs)
    with pytest.raises(InventoryError, match=re.escape(message)):
        inventory_from_tofu(outputs)


def test_yaml_round_trip_keeps_addresses_strings(outputs: dict[str, Any], tmp_path: Path) -> None:
    inv = inventory_from_tofu(outputs)
    text = render_inventory(inv)
    assert text.startswith("# Generated by `tierserve inventory --from-tofu`")
    assert yaml.safe_load(text) == inv
    path = write_inventory(inv, tmp_path / "inv" / "hosts.yml")
    assert yaml.safe_load(path.read_text()) == inv and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["hosts.yml"]  # no temporary file left


def test_cli_writes_or_prints_the_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "hosts.yml"
    assert main(["inventory", "--from-tofu", str(FIXTURE), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == inventory_from_tofu(json.loads(FIXTURE.read_text()))
    assert "3 agent VM(s)" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(FIXTURE.read_text()))
    assert main(["inventory", "--from-tofu", "-", "--wireguard-over", "private"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["all"]["children"]["gpu_nodes"]["hosts"]["gpu1"]["wireguard_endpoint"] == "10.20.2.2"
    assert main(["inventory", "--from-tofu", str(tmp_path / "missing.json")]) == 1
    (tmp_path / "plan.txt").write_text("Plan: 5 to add")
    assert main(["inventory", "--from-tofu", str(tmp_path / "plan.txt")]) == 1
    assert "not JSON" in capsys.readouterr().err


def ansible_playbook(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "ansible-playbook"
    exe = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    assert exe, "ansible-playbook is not installed (the test extras' ansible-lint brings it)"
    env = {"ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


CHECK = """
- name: Inventory check
  hosts: gpu_nodes:agents
  gather_facts: false
  connection: local
  tasks:
    - name: Show what the roles will template from the inventory
      ansible.builtin.debug:
        msg: "HOST={{ inventory_hostname }} ADDR={{ wireguard_address }} PEERS={{ wireguard_peer_groups | join(',') }}
          INGRESS={{ firewall_ingress_sources | default([]) | join(',') }} PROFILE={{ tierserve_profile }} END"
"""


def test_ansible_reads_the_generated_inventory(outputs: dict[str, Any], tmp_path: Path) -> None:
    inventory = write_inventory(inventory_from_tofu(outputs), tmp_path / "hosts.yml")
    (tmp_path / "group_vars").symlink_to(ANSIBLE / "group_vars")
    (tmp_path / "check.yml").write_text(CHECK)
    proc = ansible_playbook("-i", str(inventory), str(tmp_path / "check.yml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    seen = dict(re.findall(r"HOST=(\S+) ADDR=(\S+)\s", proc.stdout))
    assert seen == {"gpu1": "10.66.0.1", "agent1": "10.66.0.11", "agent2": "10.66.0.12", "agent3": "10.66.0.13"}
    # The GPU node admits the agents (and itself) to the ingress; every host has the profile.
    ingress = re.search(r"HOST=gpu1 .*?INGRESS=(\S*)\s", proc.stdout)
    assert ingress and set(ingress.group(1).split(",")) == set(seen.values())
    assert proc.stdout.count("PROFILE=gpu END") == 4
    syntax = ansible_playbook("-i", str(inventory), "site.yml", "--syntax-check", cwd=ANSIBLE)
    assert syntax.returncode == 0, syntax.stdout[-3000:] + syntax.stderr[-2000:]
