"""Request metrics per tier and provider, and the re-export of each engine's own vLLM metrics.

Labels are bounded by configuration (tiers, providers, endpoints, statuses, reasons): nothing per request.
Each request costs a handful of metric operations at its start and end, none per streamed token.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

LOCAL = "local"  # provider label of requests served by a local tier
NO_TIER = "none"  # tier label of requests refused before a tier was known (bad key, body or model)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
# vLLM's engine metrics worth re-exporting per tier (queue, running, KV cache, its own token counters).
ENGINE_METRIC_PREFIX = "vllm:"
WAITING_METRIC = "vllm:num_requests_waiting"


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tierserve_requests", "Requests by outcome", ["tier", "provider", "endpoint", "status"], registry=registry
        )
        self.duration = Histogram(
            "tierserve_request_duration_seconds", "End-to-end request latency", ["tier", "provider", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.ttft = Histogram(
            "tierserve_time_to_first_token_seconds", "Time to first streamed chunk", ["tier", "provider"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "tierserve_inter_token_latency_seconds", "Mean inter-token latency of each streamed request",
            ["tier", "provider"], buckets=TOKEN_LATENCY_BUCKETS, registry=registry,
        )
        self.prompt_tokens = Counter(
            "tierserve_prompt_tokens", "Prompt tokens", ["tier", "provider"], registry=registry
        )
        self.completion_tokens = Counter(
            "tierserve_completion_tokens", "Completion tokens", ["tier", "provider"], registry=registry
        )
        self.in_flight = Gauge("tierserve_requests_in_flight", "Requests being served", ["tier"], registry=registry)
        self.queue_depth = Gauge(
            "tierserve_queue_depth", "Requests waiting in the tier's engines (vLLM's waiting count)", ["tier"],
            registry=registry,
        )
        self.batch_slots_in_use = Gauge(
            "tierserve_batch_slots_in_use", "Requests of batch keys holding one of the tier's batch slots", ["tier"],
            registry=registry,
        )
        self.batch_slots_waiting = Gauge(
            "tierserve_batch_slots_waiting", "Requests of batch keys waiting in the gateway for a batch slot",
            ["tier"], registry=registry,
        )
        self.fallbacks = Counter(
            "tierserve_fallbacks", "Requests sent away from their tier, by reason", ["tier", "reason"],
            registry=registry,
        )
        self.cost = Counter("tierserve_cost_usd", "Spend in US dollars", ["provider"], registry=registry)
        self.tier_ejections = Counter(
            "tierserve_tier_ejections", "Times a tier left routing because a replica or its engine died", ["tier"],
            registry=registry,
        )
        # Scaled to zero counts as ready: a request starts a replica.
        self.tier_ready = Gauge(
            "tierserve_tier_ready", "1 while the router can send the tier requests, 0 while it has nowhere to run",
            ["tier"], registry=registry,
        )

        # result: hit, miss, or bypass (the request's Cache-Control said no-cache or no-store)
        self.response_cache = Counter(
            "tierserve_response_cache_lookups", "Response-cache lookups of cacheable requests, by result",
            ["tier", "result"], registry=registry,
        )
        self.response_cache_entries = Gauge(
            "tierserve_response_cache_entries", "Answers held by the response cache", [], registry=registry)
        self.response_cache_bytes = Gauge(
            "tierserve_response_cache_bytes", "Bytes of answers held by the response cache", [], registry=registry)

        self.ongoing: dict[str, int] = {}  # the same in-flight counts, for the router (no metric lookups)
        self.mean_duration_s: dict[str, float] = {}  # EWMA of locally served requests, for wait estimates

    def response_cache_changed(self, entries: int, size: int) -> None:
        self.response_cache_entries.set(entries)
        self.response_cache_bytes.set(size)

    def batch_slots_changed(self, tier: str, in_use: int, waiting: int) -> None:
        self.batch_slots_in_use.labels(tier).set(in_use)
        self.batch_slots_waiting.labels(tier).set(waiting)


class AgentMetrics:
    """Per-agent counters. Bounded: agents are the key store's few names, plus `unauthenticated`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("tierserve_agent_requests", "Requests per agent by status", ["agent", "status"],
                                registry=registry)
        self.tokens = Counter("tierserve_agent_tokens", "Tokens per agent", ["agent", "kind"], registry=registry)
        self.cost = Counter("tierserve_agent_cost_usd", "Spend per agent in US dollars", ["agent"],
                            registry=registry)
        self.gpu_seconds = Counter("tierserve_agent_gpu_seconds", "GPU-seconds per agent (request time x tier GPUs)",
                                   ["agent"], registry=registry)


def engine_metrics_text(registry: CollectorRegistry) -> str:
    """The vLLM families of a tier replica's registry, as exposition text (called in the replica)."""
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    keep, block = [], False
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            block = line.split()[2].startswith(ENGINE_METRIC_PREFIX)
        if block or line.startswith(ENGINE_METRIC_PREFIX):
            keep.append(line)
    return "\n".join(keep) + "\n"


def relabel(text: str, labels: dict[str, str]) -> Iterable[Metric]:
    """Parse a replica's engine metrics and add tier/replica labels so replicas never collide."""
    for family in text_string_to_metric_families(text):
        out = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            out.add_sample(sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp)
        yield out


def estimate_wait_s(ongoing: int, replicas: int | None, batch: int, mean_duration_s: float | None) -> float | None:
    """How long a new request would queue before an engine slot frees: requests beyond the tier's batch
    capacity (replicas x max_num_seqs), each slot freeing after about one mean request duration.
    None when it can't be told (no replica count or no served request yet)."""
    if not replicas or mean_duration_s is None:
        return None
    capacity = replicas * batch
    if ongoing < capacity:
        return 0.0
    return (ongoing - capacity + 1) / capacity * mean_duration_s


def engine_waiting(registry: CollectorRegistry) -> int:
    """vLLM's queue in this process: the sum of its `vllm:num_requests_waiting` gauge, read from that one
    collector (no exposition text to write and parse back, as for the full engine metrics)."""
    return waiting_in(registry.restricted_registry([WAITING_METRIC]).collect())


def waiting_in(families: Iterable[Metric]) -> int:
    """The same sum from metric families (that collector's, or a replica's relabelled engine metrics)."""
    return int(sum(s.value for family in families if family.name == WAITING_METRIC for s in family.samples))
