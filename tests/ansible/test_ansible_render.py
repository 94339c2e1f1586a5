"""The tierserve role's files rendered for real from the example inventories and checked against the app.

The container run (test_ansible_realrun.py) cannot install vLLM, so this is where the tierserve role's
output is checked: models.yaml (catalog + inventory overrides) must pass `tierserve validate`, the Serve
config must bind the WireGuard address and point at /etc/tierserve, and the units must run the
documented commands.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from ansible_tools import ANSIBLE_DIR, REPO, run_tool, tool

ROLE = ANSIBLE_DIR / "roles" / "tierserve"

# Extra vars (as an operator would set them in the inventory).
EXTRA_VARS = {
    "tierserve_models_source": str(REPO / "models.yaml"),
    "tierserve_deployments_source": str(REPO / "deployments"),
    "tierserve_models_overrides": {"tiers": {"coder": {"replicas": {"min": 1, "max": 3}}}},
    "tierserve_hf_token": "hf_secret_for_test",
}

RENDER_PLAYBOOK = """
- name: Render the tierserve role's files locally
  hosts: gpu_nodes
  gather_facts: false
  connection: local
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  roles:
    - role: render
"""

# A role whose defaults are the tierserve role's (so they rank below the inventory, as in site.yml) and
# whose tasks render its templates into a local directory instead of the host.
RENDER_TASKS = """
- name: Make the output directory
  ansible.builtin.file:
    path: "{{ render_dir }}/{{ inventory_hostname }}"
    state: directory
    mode: "0755"
- name: Render the config files and units
  ansible.builtin.template:
    src: "{{ role }}/templates/{{ item }}.j2"
    dest: "{{ render_dir }}/{{ inventory_hostname }}/{{ item }}"
    mode: "0644"
  loop: "{{ ['models.yaml', 'tierserve.env'] + (['deployment.yaml'] if tierserve_ray_role != 'worker' else [])
            + tierserve_units }}"
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    playbook_dir = tmp_path_factory.mktemp("playbook")
    (playbook_dir / "group_vars").symlink_to(ANSIBLE_DIR / "group_vars")
    (playbook_dir / "render.yml").write_text(RENDER_PLAYBOOK)
    role = playbook_dir / "roles" / "render"
    (role / "tasks").mkdir(parents=True)
    (role / "tasks" / "main.yml").write_text(RENDER_TASKS)
    (role / "defaults").symlink_to(ROLE / "defaults")
    for name in ("tfgrid", "cluster"):
        inventory = ANSIBLE_DIR / "inventories" / name / "hosts.yml"
        proc = run_tool(
            tool("ansible-playbook"), "-i", str(inventory), str(playbook_dir / "render.yml"),
            "-e", json.dumps(EXTRA_VARS | {"render_dir": str(out), "role": str(ROLE)}),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    return out


def test_models_yaml_merges_overrides_and_validates(rendered) -> None:
    path = rendered / "gpu1" / "models.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["tiers"]["coder"]["replicas"] == {"min": 1, "max": 3}
    assert doc["tiers"]["fast"] == yaml.safe_load((REPO / "models.yaml").read_text())["tiers"]["fast"]
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "validate", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_standalone_units_and_config(rendered) -> None:
    node = rendered / "gpu1"
    unit = (node / "tierserve.service").read_text()
    assert (
        "ExecStart=/opt/tierserve/venv/bin/tierserve up --config /etc/tierserve/models.yaml --profile gpu "
        "--cache-dir /var/lib/tierserve/models --deployment /etc/tierserve/deployments/gpu-vm.yaml\n"
    ) in unit
    for line in ("KillSignal=SIGINT", "Restart=always", "User=tierserve", "WantedBy=multi-user.target"):
        assert f"{line}\n" in unit
    deployment = yaml.safe_load((node / "deployment.yaml").read_text())
    assert deployment["http_options"]["host"] == "10.66.0.1"
    assert deployment["http_options"]["port"] == 8000
    args = deployment["applications"][0]["args"]
    assert args == {"config": "/etc/tierserve/models.yaml", "profile": "gpu", "cache_dir": "/var/lib/tierserve/models"}
    env = (node / "tierserve.env").read_text()
    assert "TIERSERVE_HOST=10.66.0.1\n" in env and "TIERSERVE_PORT=8000\n" in env
    assert "HF_TOKEN=hf_secret_for_test\n" in env
    assert not (node / "tierserve-ray-head.service").exists()


def test_cluster_head_and_workers(rendered) -> None:
    head = (rendered / "gpu-head" / "tierserve-ray-head.service").read_text()
    assert "ray start --head --block --port 6379 --node-ip-address 10.66.0.1 --dashboard-host 127.0.0.1" in head
    assert """--resources '{"tier_coder": 1}'""" in head
    app = (rendered / "gpu-head" / "tierserve-cluster-app.service").read_text()
    assert "serve deploy --address http://127.0.0.1:8265 /etc/tierserve/deployments/cluster.yaml" in app
    deployment = yaml.safe_load((rendered / "gpu-head" / "deployment.yaml").read_text())
    assert deployment["http_options"]["host"] == "10.66.0.1"
    assert deployment["applications"][0]["args"]["profile"] == "cluster"
    for worker, address, resource in (("gpu-w1", "10.66.0.2", "tier_reasoning"), ("gpu-w2", "10.66.0.3", "tier_fast")):
        unit = (rendered / worker / "tierserve-ray-worker.service").read_text()
        assert f"--address 10.66.0.1:6379 --node-ip-address {address}" in unit
        assert f'"{resource}": 1' in unit
        assert not (rendered / worker / "deployment.yaml").exists()
