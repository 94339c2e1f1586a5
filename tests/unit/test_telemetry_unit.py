"""The router's wait estimate, and the engines' metrics as the ingress reads and re-exports them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

from serving.ops.metrics import (
    engine_metrics_text,
    engine_waiting,
    estimate_wait_s,
    relabel,
    waiting_in,
)


def test_wait_estimate_counts_requests_beyond_the_batch_capacity() -> None:
    assert estimate_wait_s(ongoing=10, replicas=2, batch=8, mean_duration_s=2.0) == 0.0  # fits the batches
    assert estimate_wait_s(ongoing=16, replicas=2, batch=8, mean_duration_s=2.0) == 2.0 / 16  # first queued
    assert estimate_wait_s(ongoing=47, replicas=2, batch=8, mean_duration_s=2.0) == 32 / 16 * 2.0
    assert estimate_wait_s(ongoing=99, replicas=None, batch=8, mean_duration_s=2.0) is None  # unknown
    assert estimate_wait_s(ongoing=99, replicas=0, batch=8, mean_duration_s=2.0) is None
    assert estimate_wait_s(ongoing=99, replicas=1, batch=8, mean_duration_s=None) is None  # nothing served yet


def test_engine_queue_is_read_from_the_gauge_alone_and_agrees_with_the_scraped_text() -> None:
    registry = CollectorRegistry()
    waiting = Gauge("vllm:num_requests_waiting", "queued", ["model_name", "engine"], registry=registry)
    Gauge("vllm:num_requests_running", "running", ["model_name", "engine"], registry=registry).labels("m", "0").set(7)
    Histogram("vllm:e2e_request_latency_seconds", "latency", ["model_name"], registry=registry).labels("m").observe(1)
    Gauge("tierserve_other", "not the engine's", registry=registry).set(99)
    assert engine_waiting(registry) == 0  # no engine label set yet
    waiting.labels("m", "0").set(3)
    waiting.labels("m", "1").set(2)  # a second engine (data parallel) adds to the queue
    assert engine_waiting(registry) == 5
    families = list(relabel(engine_metrics_text(registry), {"tier": "fast", "replica": "r1"}))
    assert waiting_in(families) == 5
    names = {f.name for f in families}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:e2e_request_latency_seconds"} <= names
    assert all(n.startswith("vllm:") for n in names)  # the gateway's own metrics are not the engine's
    assert all(s.labels["tier"] == "fast" and s.labels["replica"] == "r1" for f in families for s in f.samples)
