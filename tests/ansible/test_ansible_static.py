"""Lint and syntax checks of the playbooks and the CUDA image (real tools; a missing tool fails)."""

from __future__ import annotations

import re

import pytest
from ansible_tools import ANSIBLE_DIR, INVENTORIES, REPO, run_tool, tool


def test_inventories_exist() -> None:
    assert {p.parent.name for p in INVENTORIES} >= {"tfgrid", "cloud", "cluster"}


def test_ansible_lint_production_profile() -> None:
    proc = run_tool(tool("ansible-lint"), "--profile", "production", "--strict", "--nocolor")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.parent.name)
def test_syntax_check(inventory) -> None:
    proc = run_tool(tool("ansible-playbook"), "-i", str(inventory), "site.yml", "--syntax-check")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


CHECK_PLAYBOOK = """
- name: Inventory check
  hosts: gpu_nodes:agents
  gather_facts: false
  connection: local
  tasks:
    - name: Show what the roles will template from the inventory
      ansible.builtin.debug:
        msg: >-
          ADDR={{ wireguard_address }} PEERS={{ wireguard_peer_groups }}
          INGRESS={{ firewall_ingress_sources | default([]) }}
"""


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.parent.name)
def test_inventory_variables_resolve(inventory, tmp_path) -> None:
    """Every host has a unique WireGuard address and the group variables' expressions evaluate."""
    (tmp_path / "group_vars").symlink_to(ANSIBLE_DIR / "group_vars")
    (tmp_path / "check.yml").write_text(CHECK_PLAYBOOK)
    proc = run_tool(tool("ansible-playbook"), "-i", str(inventory), str(tmp_path / "check.yml"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    addresses = re.findall(r"ADDR=(\S+) ", proc.stdout)
    assert addresses and len(addresses) == len(set(addresses)), proc.stdout
    assert "INGRESS=[" in proc.stdout


def test_hadolint_dockerfile_cuda() -> None:
    proc = run_tool(tool("hadolint"), "--failure-threshold", "info", "Dockerfile.cuda", cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*" and "!serving/" in lines, "allow-list style .dockerignore"
    assert not any(line.strip() in {"!.venv", "!.git", "!tests/"} for line in lines)


def test_every_role_has_defaults_handlers_readme() -> None:
    roles = sorted(p for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())
    assert {r.name for r in roles} == {"common", "nvidia", "wireguard", "firewall", "tierserve", "monitoring",
                                        "agent_vm"}
    for role in roles:
        for part in ("defaults/main.yml", "handlers/main.yml", "tasks/main.yml", "meta/main.yml", "README.md"):
            assert (role / part).is_file(), f"{role.name}: missing {part}"
