"""The shipped Grafana dashboard and Prometheus config: every query names a metric that tierserve exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.ops.gpu import GpuCollector
from tests.support.promql import (
    base_metric_name,
    dashboard_base_metric_names,
    dashboard_metric_names,
    dashboard_queries,
    exported_series_names,
    missing_metrics,
    promql_metric_names,
)

MONITORING = Path(__file__).resolve().parents[2] / "deployments" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"

# The request-metrics contract of serving/ops/metrics.py (name, type, labels), and the GPU collector's gauges.
CONTRACT: list[tuple[str, type, list[str]]] = [
    ("tierserve_requests_total", Counter, ["tier", "provider", "endpoint", "status"]),
    ("tierserve_request_duration_seconds", Histogram, ["tier", "provider", "endpoint"]),
    ("tierserve_time_to_first_token_seconds", Histogram, ["tier", "provider"]),
    ("tierserve_inter_token_latency_seconds", Histogram, ["tier", "provider"]),
    ("tierserve_prompt_tokens_total", Counter, ["tier", "provider"]),
    ("tierserve_completion_tokens_total", Counter, ["tier", "provider"]),
    ("tierserve_requests_in_flight", Gauge, ["tier"]),
    ("tierserve_queue_depth", Gauge, ["tier"]),
    ("tierserve_fallbacks_total", Counter, ["tier", "reason"]),
    ("tierserve_cost_usd_total", Counter, ["provider"]),
]
GPU_METRICS = {
    "tierserve_gpu_available",
    "tierserve_gpu_utilization_ratio",
    "tierserve_gpu_memory_used_bytes",
    "tierserve_gpu_memory_total_bytes",
    "tierserve_gpu_temperature_celsius",
    "tierserve_gpu_power_watts",
    "tierserve_gpu_process_memory_bytes",
}


def contract_exposition(observe: bool) -> str:
    """What an app exporting exactly the contract (plus a GPU-less node's collector) serves on /metrics."""
    registry = CollectorRegistry()
    for name, kind, labels in CONTRACT:
        metric = kind(name.removesuffix("_total"), "contract metric", labels, registry=registry)
        if observe:
            child = metric.labels(*["x"] * len(labels))
            if isinstance(child, Histogram):
                child.observe(0.1)
            elif isinstance(child, Counter):
                child.inc()
            else:
                child.set(1)
    registry.register(GpuCollector(_NoNvml(), node="n"))
    return generate_latest(registry).decode()


class _NoNvml:
    def nvmlInit(self) -> None:
        raise OSError("no driver")


def panels(node: Any) -> list[dict[str, Any]]:
    out = []
    for panel in node.get("panels", []):
        out.append(panel)
        out.extend(panels(panel))
    return out


# -- the dashboard file ------------------------------------------------------------------------------------


def test_dashboard_queries_exactly_the_exported_metrics() -> None:
    contract = {name for name, _, _ in CONTRACT}
    assert dashboard_base_metric_names(DASHBOARD) == contract | GPU_METRICS
    # Histograms are queried through their series, not their family name.
    names = dashboard_metric_names(DASHBOARD)
    assert "tierserve_request_duration_seconds_bucket" in names
    assert "tierserve_request_duration_seconds" not in names


@pytest.mark.parametrize("observed", [True, False], ids=["after-traffic", "fresh-start"])
def test_every_dashboard_series_is_exported(observed: bool) -> None:
    # Fresh start: labelled metrics have no samples yet, only HELP/TYPE; they still count as exported.
    assert missing_metrics(DASHBOARD, contract_exposition(observed)) == set()


def test_a_renamed_metric_is_caught(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text())
    target = next(p for p in panels(doc) if p.get("targets"))["targets"][0]
    target["expr"] = target["expr"].replace("tierserve_requests_total", "tierserve_request_total")
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(doc))
    assert missing_metrics(broken, contract_exposition(True)) == {"tierserve_request_total"}


def test_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    all_panels = panels(doc)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "node", "tier"} <= variables
    for panel in all_panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # One data source variable, so the dashboard imports into any Grafana unchanged.
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert promql_metric_names(target["expr"]), target["expr"]
    titles = " ".join(p["title"].lower() for p in all_panels)
    for topic in ("gpu utilisation", "gpu memory", "p50 / p95", "time to first token", "queue depth",
                  "in-flight", "fallbacks", "cost"):  # fmt: skip
        assert topic in titles, topic


def test_template_variables_are_checked_too() -> None:
    queries = dashboard_queries(DASHBOARD)
    assert "tierserve_gpu_available" in queries  # from label_values(tierserve_gpu_available, node)
    assert "tierserve_requests_total" in queries


# -- the PromQL reader -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'histogram_quantile(0.95, sum by (le, tier) (rate(h_bucket{tier=~"$tier"}[$__rate_interval])))',
            {"h_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (x) / on(tier) group_left(y) b * ignoring(z) c offset 1h", {"a_total", "b", "c"}),
        ('x{job="a,b", le=~"0.5|1"} > bool y and z', {"x", "y", "z"}),
        ("sum without (gpu) (z) unless max_over_time(w[1h:5m])", {"z", "w"}),
        ("topk by (a) (3, q)", {"q"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("rate(m[5m] offset -1w) @ 1609746000", {"m"}),
        ("avg(m) BY (x) + a:b:rate5m - vector(1)", {"m", "a:b:rate5m"}),
        ("histogram_quantile(0.9, sum(rate(h_bucket[1m])) by (le)) > on() group_right () n", {"h_bucket", "n"}),
        ("sum(increase(tierserve_cost_usd_total[$__range])) * ${factor} # comment m", {"tierserve_cost_usd_total"}),
    ],
)
def test_promql_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


@pytest.mark.parametrize(
    ("series", "base"),
    [("x_bucket", "x"), ("x_sum", "x"), ("x_count", "x"), ("x_total", "x_total"), ("x_bytes", "x_bytes")],
)
def test_base_metric_name(series: str, base: str) -> None:
    assert base_metric_name(series) == base


def test_exported_series_names_include_declared_families() -> None:
    names = exported_series_names(contract_exposition(observe=False))
    assert {"tierserve_requests_total", "tierserve_request_duration_seconds_bucket",
            "tierserve_queue_depth", "tierserve_gpu_power_watts"} <= names  # fmt: skip


# -- the Prometheus config ---------------------------------------------------------------------------------


def test_prometheus_scrapes_ingress_and_ray() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ingress = jobs["tierserve"]
    assert ingress["metrics_path"] == "/metrics"
    assert ingress["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    # Ray's head node keeps this file listing every node's metrics agent.
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
