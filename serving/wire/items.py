"""What crosses between the gateway and a backend: the call, and what comes back.

A non-streamed call returns one `Result`. A streamed call yields an error `Result` alone, or SSE bytes
followed by one `Usage` (never sent to the client) and then `[DONE]`. A `Result` with `failover=True` means
no answer was started: the dispatcher may try its next candidate (Envoy's rule: no retry after the first byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.config import Endpoint
from serving.wire.errors import APIError


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts (and, from a provider, their cost) of one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False  # the stream ended before the upstream's usage chunk


@dataclass(slots=True)
class Result:
    """A whole answer or an error: status, the JSON body bytes (serialised once, where it was made), usage."""

    status: int
    body: bytes
    usage: Usage = field(default_factory=Usage)
    failover: bool = False  # no answer was started: another candidate may answer
    retry_after: str | None = None  # the backend's Retry-After, kept for the client when every candidate failed
    replica: str = ""  # the tier replica that answered (the `x-tierserve-replica` header)

    @classmethod
    def error(cls, exc: APIError, *, failover: bool | None = None) -> Result:
        """`exc` as a Result; by default a 5xx (the engine failed, not the request) may fail over."""
        return cls(exc.status, exc.json(), failover=exc.status >= 500 if failover is None else failover,
                   retry_after=exc.headers.get("retry-after"))


StreamItem = bytes | Result | Usage


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a backend receives it. `target` is the provider for the fallback deployment; `tier` is the
    tier served (for a provider: the key of its `models` mapping); `prompt_tokens` is the router's estimate."""

    endpoint: Endpoint
    body: dict[str, Any]
    tier: str
    target: str = ""
    prompt_tokens: int = 0
    trace: dict[str, str] | None = None
    priority: int = 0  # vLLM's request priority, from the caller's key (never from the body)
    # Which conversation this is (the client's session header, or one derived from the key and the
    # conversation's opening): the tier's request router keeps one session on one replica.
    session: str = ""
    # vLLM's prefix-cache salt: the caller's cache scope (serving/security/isolation.py); None: shared.
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaPick:
    """Which replica of a tier a telemetry call (its engine's metrics, its queue) is for: the `index`-th of the
    running replicas in id order (the tiers' request router, serving/backends/replica_router.py, sends it
    there), so one call per replica reads every replica."""

    index: int = 0


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What the router knows of a provider: its breaker and its budget."""

    available: bool = True  # Breaker.available()
    retry_in_s: float = 0.0  # Breaker.retry_in_s()
    over_budget: str | None = None  # Ledger.over_budget(name)
    budget_reset_in_s: float | None = None  # Ledger.reset_in_s(name)
