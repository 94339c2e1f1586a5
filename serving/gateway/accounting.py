"""The one place a request is accounted when it ends: the request metrics, the agent's metrics, the key's
per-minute window and its ledger (spend against its budget), all from one finished record.

A request that was refused before anything was served is `rejected`; one that reached a backend holds a
`Ticket` from `open` and finishes it exactly once, whatever happened (answer, error, cut stream, hang-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from serving.config import Tier
from serving.ops.metrics import LOCAL, NO_TIER, AgentMetrics, RequestMetrics
from serving.security.keys import KeyRecord
from serving.security.quotas import Limiter
from serving.spend.pricing import Spend, local_spend
from serving.wire.items import Usage

log = logging.getLogger(__name__)

UNAUTHENTICATED = "unauthenticated"  # the agent label of requests that had no valid key
DURATION_EWMA_ALPHA = 0.1  # weight of the newest locally served request in the router's duration estimate
Status = int | str  # an HTTP status, or "stream_error" for a stream that failed after it had started


@dataclass
class Accounting:
    tiers: Mapping[str, Tier]  # their prices
    metrics: RequestMetrics
    agents: AgentMetrics
    limiter: Limiter  # the key's window and ledger
    clock: Callable[[], float] = time.perf_counter

    def rejected(self, agent: str, tier: str | None, endpoint: str, status: int) -> None:
        """A request refused before any backend was asked (401, 400, 403, 404, 413, 429, 503 from routing)."""
        self.metrics.requests.labels(tier or NO_TIER, LOCAL, endpoint, str(status)).inc()
        self.agent_answered(agent, status)

    def agent_answered(self, agent: str, status: Status) -> None:
        """The agent's request counter: every request, refused or served, counts once."""
        self.agents.requests.labels(agent, str(status)).inc()

    def open(self, key: KeyRecord, tier: str, endpoint: str) -> Ticket:
        self.metrics.in_flight.labels(tier).inc()
        self.metrics.ongoing[tier] = self.metrics.ongoing.get(tier, 0) + 1
        return Ticket(self, key, tier, endpoint)

    def spend(self, tier: str, provider: str, duration_s: float, usage: Usage) -> Spend:
        """What the request is charged: a local tier's time at its price, or the provider's token price."""
        if provider == LOCAL:
            return local_spend(self.tiers[tier], duration_s, usage.prompt_tokens, usage.completion_tokens)
        return Spend(usage.prompt_tokens, usage.completion_tokens, usage.cost_usd, 0.0)


class Ticket:
    """One admitted request on its way: which backend serves it, when its first chunk went, and its end."""

    __slots__ = ("accounting", "done", "endpoint", "first_at", "key", "provider", "started", "tier")

    def __init__(self, accounting: Accounting, key: KeyRecord, tier: str, endpoint: str) -> None:
        self.accounting = accounting
        self.key = key
        self.tier = tier
        self.endpoint = endpoint
        self.provider = LOCAL  # set by the dispatcher to the candidate it tries
        self.started = accounting.clock()
        self.first_at: float | None = None
        self.done = False

    def fell_back(self, reason: str) -> None:
        """The previous candidate failed before answering and the next is tried (`reason`: a bounded label)."""
        self.accounting.metrics.fallbacks.labels(self.tier, reason).inc()

    def first(self) -> None:
        self.first_at = self.accounting.clock()
        self.accounting.metrics.ttft.labels(self.tier, self.provider).observe(self.first_at - self.started)

    def finish(self, status: Status, usage: Usage | None = None) -> None:
        """Exactly once (later calls do nothing): metrics, the router's estimates, the key's window and ledger."""
        if self.done:
            return
        self.done = True
        a = self.accounting
        usage = usage or Usage()
        now = a.clock()
        took = now - self.started
        self._measure(status, usage, took, now)
        spend = a.spend(self.tier, self.provider, took, usage)
        agent = self.key.agent
        a.agent_answered(agent, status)
        if spend.prompt_tokens:
            a.agents.tokens.labels(agent, "prompt").inc(spend.prompt_tokens)
        if spend.completion_tokens:
            a.agents.tokens.labels(agent, "completion").inc(spend.completion_tokens)
        if spend.cost_usd:
            a.agents.cost.labels(agent).inc(spend.cost_usd)
        if spend.gpu_seconds:
            a.agents.gpu_seconds.labels(agent).inc(spend.gpu_seconds)
        if spend.prompt_tokens or spend.completion_tokens or spend.cost_usd or status == 200:
            try:
                a.limiter.record(self.key, spend.prompt_tokens, spend.completion_tokens, spend.cost_usd,
                                 estimated=usage.estimated)
            except Exception:  # a full disk must not fail a request that was already answered
                log.exception("usage of agent %s not recorded", agent)

    def _measure(self, status: Status, usage: Usage, took: float, now: float) -> None:
        m = self.accounting.metrics
        tier, provider = self.tier, self.provider
        m.in_flight.labels(tier).dec()
        m.ongoing[tier] -= 1
        if usage.cost_usd:
            m.cost.labels(provider).inc(usage.cost_usd)
        m.requests.labels(tier, provider, self.endpoint, str(status)).inc()
        m.duration.labels(tier, provider, self.endpoint).observe(took)
        if provider == LOCAL and status == 200:
            prev = m.mean_duration_s.get(tier)
            m.mean_duration_s[tier] = took if prev is None else prev + DURATION_EWMA_ALPHA * (took - prev)
        if usage.prompt_tokens:
            m.prompt_tokens.labels(tier, provider).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            m.completion_tokens.labels(tier, provider).inc(usage.completion_tokens)
        if self.first_at is not None and usage.completion_tokens > 1:
            m.itl.labels(tier, provider).observe((now - self.first_at) / (usage.completion_tokens - 1))
