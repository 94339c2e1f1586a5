"""The monitoring role's Prometheus config and alert rules, rendered for real from the example inventories.

Rendered by ansible-playbook from the role's own templates and defaults (as site.yml applies them), then: the alerts
are the expected ones, every metric an expression names is exported (tierserve's, by the code that exports them;
Ray Serve's, by the installed Ray; the node exporter's, by the real exporter when it is installed), nothing listens
on a wildcard, and promtool (Debian package `prometheus`) checks the files and runs unit tests of the alerts.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.ops.gpu import GpuCollector
from tests.support.promql import exported_series_names, promql_metric_names

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "monitoring"
STATIC_RULES = REPO / "deployments" / "monitoring" / "tierserve-alerts.yml"

ALERTS = {
    "TierserveIngressDown", "TierserveTierNotReady", "TierserveGpuMemoryHigh", "TierserveGpuTemperatureHigh",
    "TierserveGpuTelemetryMissing", "TierserveDiskNearlyFull", "TierserveFallbackRateHigh", "TierserveSpendNearBudget",
}  # fmt: skip
# Metrics that are not tierserve's, and where the test finds them.
PROMETHEUS_BUILTIN = {"up"}
NODE_EXPORTER = {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"}
# A provider with budgets, as an operator would add it through tierserve_models_overrides.
OVERRIDES = {"providers": [{
    "name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY",
    "models": {"fast": "gpt-4.1-mini"}, "paid": True, "price_input_per_1m_usd": 2.0, "price_output_per_1m_usd": 8.0,
    "budget_daily_usd": 20, "budget_monthly_usd": 300, "priority": 40,
}]}  # fmt: skip
EXTRA_BUDGETS = [{"scope": "agent", "name": "doc-writer", "period": "month", "usd": 20}]
# deployments/monitoring/tierserve-alerts.yml is the role's rules with its defaults and this one example budget.
STATIC_VARS = {"monitoring_extra_budgets": [{"scope": "total", "period": "month", "usd": 100}]}

RENDER_PLAYBOOK = """
- name: Render the monitoring role's files locally
  hosts: gpu_nodes
  gather_facts: false
  connection: local
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  roles:
    - role: render
"""
# The role's defaults (symlinked, so they rank as in site.yml) and templates, rendered into a directory.
RENDER_TASKS = """
- name: Make the output directory
  ansible.builtin.file:
    path: "{{ render_dir }}/{{ inventory_hostname }}"
    state: directory
    mode: "0755"
- name: Render the files
  ansible.builtin.template:
    src: "{{ role }}/templates/{{ item }}.j2"
    dest: "{{ render_dir }}/{{ inventory_hostname }}/{{ item }}"
    mode: "0644"
  loop: "{{ (['prometheus.yml', 'tierserve-alerts.yml', 'prometheus.default'] if monitoring_prometheus_enabled | bool
             else []) + ['prometheus-node-exporter.default'] }}"
"""


def run_ansible(*args: str) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "ansible-playbook"
    exe = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    assert exe, "ansible-playbook is not installed (the test extras' ansible-lint brings it)"
    env = {"ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "PATH": "/usr/bin:/bin",
           "ANSIBLE_RETRY_FILES_ENABLED": "0"}  # fmt: skip
    return subprocess.run([exe, *args], cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=300, check=False)


def render(tmp: Path, inventory: str, extra: dict[str, Any]) -> Path:
    out = tmp / "out"
    playbook = tmp / "playbook"
    (playbook / "roles" / "render" / "tasks").mkdir(parents=True)
    (playbook / "group_vars").symlink_to(ANSIBLE / "group_vars")
    (playbook / "render.yml").write_text(RENDER_PLAYBOOK)
    (playbook / "roles" / "render" / "tasks" / "main.yml").write_text(RENDER_TASKS)
    (playbook / "roles" / "render" / "defaults").symlink_to(ROLE / "defaults")
    extra_vars = {"render_dir": str(out), "role": str(ROLE), "monitoring_models_source": str(REPO / "models.yaml"),
                  # promtool resolves rule_files from the config: point it at the rendered rules.
                  "monitoring_rules_dir": str(out / "{{ inventory_hostname }}")} | extra  # fmt: skip
    proc = run_ansible("-i", str(ANSIBLE / "inventories" / inventory / "hosts.yml"), str(playbook / "render.yml"),
                       "-e", json.dumps(extra_vars))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tfgrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpu1 of the TFGrid inventory: a provider with budgets, an agent budget, and the tier alert's `for:` shortened."""
    extra = {"tierserve_models_overrides": OVERRIDES, "monitoring_extra_budgets": EXTRA_BUDGETS,
             "monitoring_tier_not_ready_for": "30s"}  # fmt: skip
    return render(tmp_path_factory.mktemp("tfgrid"), "tfgrid", extra) / "gpu1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("cluster"), "cluster", {})


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(tmp_path_factory.mktemp("defaults"), "tfgrid", STATIC_VARS) / "gpu1"


def rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def by_name(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in rules(path):
        out.setdefault(rule["alert"], []).append(rule)
    return out


# -- which metrics exist ------------------------------------------------------------------------------------


def tierserve_exposition() -> str:
    """What tierserve's /metrics declares: every Counter/Gauge/Histogram named tierserve_* in serving/ (wherever
    it is defined), with its type and labels as written there, plus the GPU collector's families."""
    registry = CollectorRegistry()
    kinds = {"Counter": Counter, "Gauge": Gauge, "Histogram": Histogram}
    found = set()
    call = re.compile(r'\b(Counter|Gauge|Histogram)\(\s*"(tierserve_\w+)"\s*,\s*"[^"]*"\s*,\s*\[([^\]]*)\]')
    for path in (REPO / "serving").rglob("*.py"):
        for kind, name, labels in call.findall(path.read_text()):
            if name not in found:
                found.add(name)
                kinds[kind](name, "from " + path.name, re.findall(r'"(\w+)"', labels), registry=registry)
    assert {"tierserve_requests", "tierserve_fallbacks", "tierserve_cost_usd", "tierserve_agent_cost_usd"} <= found

    class NoNvml:
        def nvmlInit(self) -> None:
            raise OSError("no driver")

    registry.register(GpuCollector(NoNvml(), node="n"))
    return generate_latest(registry).decode()


def ray_serve_metric_exists(name: str) -> bool:
    """Ray exports its own metrics with a `ray_` prefix; Serve's are declared in ray/serve/_private."""
    spec = importlib.util.find_spec("ray")  # located, not imported: importing Ray costs seconds
    assert spec is not None and spec.origin is not None, "Ray is not installed"
    source = Path(spec.origin).parent / "serve" / "_private"
    short = name.removeprefix("ray_")
    return any(f'"{short}"' in p.read_text() for p in source.glob("*.py"))


def test_the_exposition_reader_sees_the_request_metrics() -> None:
    from serving.ops.metrics import RequestMetrics

    registry = CollectorRegistry()
    RequestMetrics(registry)
    assert exported_series_names(generate_latest(registry).decode()) <= exported_series_names(tierserve_exposition())


def test_every_alert_names_only_exported_metrics(tfgrid: Path) -> None:
    exported = exported_series_names(tierserve_exposition())
    for rule in rules(tfgrid / "tierserve-alerts.yml"):
        for name in promql_metric_names(rule["expr"]):
            if name.startswith("tierserve_"):
                assert name in exported, f"{rule['alert']}: {name} is not exported by serving/"
            elif name.startswith("ray_"):
                assert ray_serve_metric_exists(name), f"{rule['alert']}: {name} is not a Ray Serve metric"
            else:
                assert name in PROMETHEUS_BUILTIN | NODE_EXPORTER, f"{rule['alert']}: unknown metric {name}"


def test_node_exporter_metric_names_are_real(tmp_path: Path) -> None:
    exe = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exe is None:
        pytest.skip("prometheus-node-exporter is not installed (Debian: apt-get install prometheus-node-exporter)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).raise_for_status().text
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert exported_series_names(text) >= NODE_EXPORTER


# -- the rules ----------------------------------------------------------------------------------------------


def test_rules_have_the_expected_alerts(tfgrid: Path) -> None:
    alerts = by_name(tfgrid / "tierserve-alerts.yml")
    assert set(alerts) == ALERTS
    for name, found in alerts.items():
        for rule in found:
            assert rule["labels"]["severity"] in ("warning", "critical"), name
            assert rule["annotations"]["summary"], name
    assert alerts["TierserveTierNotReady"][0]["for"] == "30s"  # the role variable, shortened here
    # One spend rule per budget: the provider's daily and monthly (from the catalog's overrides) and the agent's.
    spend = {(r["labels"]["scope"], r["labels"]["budget"], r["labels"]["period"]): r["expr"]
             for r in alerts["TierserveSpendNearBudget"]}  # fmt: skip
    assert set(spend) == {("provider", "openai", "day"), ("provider", "openai", "month"),
                          ("agent", "doc-writer", "month")}  # fmt: skip
    assert spend[("provider", "openai", "day")] == (
        'sum(increase(tierserve_cost_usd_total{provider="openai"}[1d])) > 0.8 * 20'
    )
    assert 'tierserve_agent_cost_usd_total{agent="doc-writer"}[31d]' in spend[("agent", "doc-writer", "month")]


def test_defaults_and_the_shipped_rules_file(defaults: Path) -> None:
    alerts = by_name(defaults / "tierserve-alerts.yml")
    assert alerts["TierserveTierNotReady"][0]["for"] == "2m"
    assert alerts["TierserveIngressDown"][0]["for"] == "1m"
    # No provider in the catalog has a budget: only the example total one.
    assert [r["expr"] for r in alerts["TierserveSpendNearBudget"]] == [
        "sum(increase(tierserve_cost_usd_total[31d])) > 0.8 * 100"
    ]
    # The copy in deployments/monitoring (for a Prometheus run by hand) is this rendering.
    assert yaml.safe_load(STATIC_RULES.read_text()) == yaml.safe_load((defaults / "tierserve-alerts.yml").read_text())
    config = yaml.safe_load((REPO / "deployments" / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == [STATIC_RULES.name]


def test_no_budget_no_spend_rules(cluster: Path) -> None:
    assert "TierserveSpendNearBudget" not in by_name(cluster / "gpu-head" / "tierserve-alerts.yml")


# -- the scrape config and listen addresses -----------------------------------------------------------------


def default_args(path: Path) -> str:
    match = re.search(r'^ARGS="(.*)"$', path.read_text(), re.MULTILINE)
    assert match, path
    return match.group(1)


def test_standalone_scrapes_the_ingress_where_it_binds(tfgrid: Path) -> None:
    config = yaml.safe_load((tfgrid / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # gpu1's WireGuard address: tierserve_host's default, what the tierserve role's ingress binds.
    assert jobs["tierserve"]["static_configs"][0]["targets"] == ["10.66.0.1:8000"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["node"]["static_configs"][0]["targets"] == ["127.0.0.1:9100"]
    assert config["rule_files"] == [str(tfgrid / "tierserve-alerts.yml")]
    assert "--web.listen-address=127.0.0.1:9090 " in default_args(tfgrid / "prometheus.default") + " "
    assert default_args(tfgrid / "prometheus-node-exporter.default") == "--web.listen-address=127.0.0.1:9100"


def test_cluster_head_scrapes_its_workers_over_wireguard(cluster: Path) -> None:
    config = yaml.safe_load((cluster / "gpu-head" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["node"]["static_configs"][0]["targets"] == ["10.66.0.1:9100", "10.66.0.2:9100", "10.66.0.3:9100"]
    for host, address in (("gpu-head", "10.66.0.1"), ("gpu-w1", "10.66.0.2"), ("gpu-w2", "10.66.0.3")):
        args = default_args(cluster / host / "prometheus-node-exporter.default")
        assert args == f"--web.listen-address={address}:9100"
    # Workers run no Prometheus.
    assert not (cluster / "gpu-w1" / "prometheus.yml").exists()


def test_nothing_listens_on_a_wildcard(tfgrid: Path, cluster: Path) -> None:
    for path in [*tfgrid.iterdir(), *cluster.rglob("*")]:
        if path.is_file():
            text = path.read_text()
            assert "0.0.0.0" not in text and "[::]" not in text and ":::" not in text, path


def test_the_role_refuses_a_wildcard_listen_address() -> None:
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    check = tasks[0]["ansible.builtin.assert"]
    assert "'0.0.0.0'" in check["that"][0] and "wireguard_address" in check["that"][1]


# -- promtool -----------------------------------------------------------------------------------------------


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return exe


def test_promtool_checks_the_rendered_files(tfgrid: Path, cluster: Path, defaults: Path) -> None:
    exe = promtool()
    for directory in (tfgrid, cluster / "gpu-head", defaults):
        for args in (["check", "rules", str(directory / "tierserve-alerts.yml")],
                     ["check", "config", str(directory / "prometheus.yml")]):  # fmt: skip
            proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([exe, "check", "rules", str(STATIC_RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The alerts' behaviour over time (promtool test rules). Annotations are dropped from the copy under test:
# `promtool check rules` has checked their templates, and the expected alerts then need only their labels.
ALERT_TESTS = {
    "rule_files": ["rules.yml"],
    "evaluation_interval": "15s",
    "tests": [
        {
            "interval": "15s",
            "input_series": [
                {"series": 'up{job="tierserve", instance="10.66.0.1:8000"}', "values": "1 1 0x40"},
                # coder's only replica turns unhealthy; fast is scaled to zero (target 0): never an alert.
                {"series": 'ray_serve_autoscaling_target_replicas{application="tierserve", deployment="tier-coder"}',
                 "values": "1x40"},
                {"series": 'ray_serve_deployment_replica_healthy{application="tierserve", deployment="tier-coder", '
                           'replica="a"}', "values": "1 1 0x40"},
                {"series": 'ray_serve_autoscaling_target_replicas{application="tierserve", deployment="tier-fast"}',
                 "values": "0x40"},
                # The ingress's own view: reasoning (embedded in the ingress replica) loses its engine.
                {"series": 'tierserve_tier_ready{job="tierserve", instance="10.66.0.1:8000", tier="reasoning"}',
                 "values": "1 1 0x40"},
                {"series": 'tierserve_tier_ready{job="tierserve", instance="10.66.0.1:8000", tier="fast"}',
                 "values": "1x40"},
                {"series": 'tierserve_gpu_temperature_celsius{gpu="0", uuid="GPU-1", node="gpu1"}', "values": "91x40"},
                {"series": 'tierserve_gpu_memory_used_bytes{gpu="0", uuid="GPU-1", node="gpu1"}', "values": "79e9x40"},
                {"series": 'tierserve_gpu_memory_total_bytes{gpu="0", uuid="GPU-1", node="gpu1"}', "values": "80e9x40"},
                {"series": 'tierserve_gpu_available{node="gpu1"}', "values": "1x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "20s", "alertname": "TierserveTierNotReady", "exp_alerts": []},  # pending (for: 30s)
                {"eval_time": "2m", "alertname": "TierserveTierNotReady", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "tier": "coder"}},
                    {"exp_labels": {"severity": "critical", "tier": "reasoning"}}]},
                {"eval_time": "1m", "alertname": "TierserveIngressDown", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "TierserveIngressDown", "exp_alerts": [{"exp_labels": {
                    "severity": "critical", "job": "tierserve", "instance": "10.66.0.1:8000"}}]},
                {"eval_time": "6m", "alertname": "TierserveGpuTemperatureHigh", "exp_alerts": [{"exp_labels": {
                    "severity": "warning", "gpu": "0", "node": "gpu1"}}]},
                {"eval_time": "6m", "alertname": "TierserveGpuMemoryHigh", "exp_alerts": [{"exp_labels": {
                    "severity": "warning", "gpu": "0", "node": "gpu1"}}]},
                {"eval_time": "6m", "alertname": "TierserveGpuTelemetryMissing", "exp_alerts": []},
            ],
        },
        {
            "interval": "15s",
            "input_series": [
                # 10 requests and 5 fallbacks of coder every 15 s; fast: 1 request and 1 fallback an hour (too few).
                {"series": 'tierserve_requests_total{tier="coder", provider="local", endpoint="chat", status="200"}',
                 "values": "0+10x120"},
                {"series": 'tierserve_fallbacks_total{tier="coder", reason="saturated"}', "values": "0+5x120"},
                {"series": 'tierserve_requests_total{tier="fast", provider="local", endpoint="chat", status="200"}',
                 "values": "0x60 1x60"},
                {"series": 'tierserve_fallbacks_total{tier="fast", reason="saturated"}', "values": "0x60 1x60"},
                {"series": 'node_filesystem_avail_bytes{instance="127.0.0.1:9100", job="node", device="/dev/vda", '
                           'fstype="ext4", mountpoint="/"}', "values": "5e9x120"},
                {"series": 'node_filesystem_size_bytes{instance="127.0.0.1:9100", job="node", device="/dev/vda", '
                           'fstype="ext4", mountpoint="/"}', "values": "100e9x120"},
                {"series": 'node_filesystem_avail_bytes{instance="127.0.0.1:9100", job="node", device="tmpfs", '
                           'fstype="tmpfs", mountpoint="/run"}', "values": "0x120"},
                {"series": 'node_filesystem_size_bytes{instance="127.0.0.1:9100", job="node", device="tmpfs", '
                           'fstype="tmpfs", mountpoint="/run"}', "values": "1e9x120"},
                # openai spends 0.1 USD every 15 s: 8 USD after 20 min, 24 after an hour (daily budget 20, at 16).
                {"series": 'tierserve_cost_usd_total{provider="openai"}', "values": "0+0.1x300"},
                {"series": 'tierserve_agent_cost_usd_total{agent="doc-writer"}', "values": "0+0.01x300"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "TierserveFallbackRateHigh", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "TierserveFallbackRateHigh", "exp_alerts": [{"exp_labels": {
                    "severity": "warning", "tier": "coder"}}]},
                {"eval_time": "5m", "alertname": "TierserveDiskNearlyFull", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "TierserveDiskNearlyFull", "exp_alerts": [{"exp_labels": {
                    "severity": "warning", "instance": "127.0.0.1:9100", "job": "node", "device": "/dev/vda",
                    "fstype": "ext4", "mountpoint": "/"}}]},
                {"eval_time": "20m", "alertname": "TierserveSpendNearBudget", "exp_alerts": []},
                {"eval_time": "60m", "alertname": "TierserveSpendNearBudget", "exp_alerts": [{"exp_labels": {
                    "severity": "warning", "scope": "provider", "budget": "openai", "period": "day"}}]},
            ],
        },
    ],
}


def test_promtool_alert_unit_tests(tfgrid: Path, tmp_path: Path) -> None:
    exe = promtool()
    doc = yaml.safe_load((tfgrid / "tierserve-alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(ALERT_TESTS, sort_keys=False))
    proc = subprocess.run([exe, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
