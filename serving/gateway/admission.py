"""Admission: who is asking, may they, and what did they use. The first and last step of every /v1 request.

Order on the request path (serving/ingress.py): `authenticate` (401) → `read_body` (413/408/400) →
`check_shape` (400 naming the field) → the router picks a tier → `admit` (403 tier, 400 max_tokens cap, 429
rate/tokens/budget) → the tier or provider answers → `account` (per-key window, ledger, per-agent metrics).
Checks that reject cost no engine time; a 401 never reads the body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from serving.config import AppConfig, AuthSettings, Tier
from serving.gateway.limits import check_max_tokens, check_request, read_limited, tier_max_tokens
from serving.ops.metrics import LOCAL
from serving.security.keys import KeyRecord, KeyStore, check_tier, usage_db_path
from serving.security.quotas import Limiter
from serving.security.redaction import auth_disabled_warning
from serving.spend.ledger import Budget
from serving.wire.errors import APIError, from_validation_errors

log = logging.getLogger(__name__)

UNAUTHENTICATED = "unauthenticated"  # the agent label of requests that had no valid key


@dataclass(frozen=True, slots=True)
class Spend:
    """What one finished request used, as charged to its key."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    gpu_seconds: float


def local_spend(tier: Tier, duration_s: float, prompt_tokens: int, completion_tokens: int) -> Spend:
    """A locally served request: GPU-seconds = its duration x the tier's GPUs (an upper bound, since concurrent
    requests share the engine's batch); cost = its duration at the tier's hourly price."""
    gpu_seconds = duration_s * tier.resources.gpus
    hourly = tier.cost_per_hour_usd
    if hourly is None and tier.cost_per_gpu_hour_usd is not None:
        hourly = tier.cost_per_gpu_hour_usd * tier.resources.gpus
    return Spend(prompt_tokens, completion_tokens, duration_s * (hourly or 0.0) / 3600, gpu_seconds)


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

    def rejected(self, agent: str, status: int) -> None:
        self.requests.labels(agent, str(status)).inc()

    def finished(self, agent: str, status: int | str, spend: Spend) -> None:
        self.requests.labels(agent, str(status)).inc()
        if spend.prompt_tokens:
            self.tokens.labels(agent, "prompt").inc(spend.prompt_tokens)
        if spend.completion_tokens:
            self.tokens.labels(agent, "completion").inc(spend.completion_tokens)
        if spend.cost_usd:
            self.cost.labels(agent).inc(spend.cost_usd)
        if spend.gpu_seconds:
            self.gpu_seconds.labels(agent).inc(spend.gpu_seconds)


class Admission:
    def __init__(
        self, config: AppConfig, state_dir: Path, registry: CollectorRegistry, settings: AuthSettings | None = None
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.keys = KeyStore.from_config(config, state_dir, settings)
        self.ledger = Budget(usage_db_path(config.auth, state_dir), config.providers, config.tiers)
        self.limiter = Limiter(ledger=self.ledger)
        self.metrics = AgentMetrics(registry)
        self.caps = {name: tier_max_tokens(tier, config.limits) for name, tier in config.tiers.items()}
        warning = auth_disabled_warning(config)
        if warning:
            log.warning(warning)

    # -- before routing ---------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> KeyRecord:
        try:
            return self.keys.authenticate(request.headers.get("authorization"))
        except APIError as exc:
            self.metrics.rejected(UNAUTHENTICATED, exc.status)
            raise

    def authenticate_admin(self, request: Request) -> KeyRecord:
        return self.keys.authenticate_admin(request.headers.get("authorization"))

    async def read_body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read under the size and upload-time limits."""
        raw = await read_limited(request.stream(), self.limits, request.headers.get("content-length"))
        return parse_json_object(raw)

    def check_shape(self, key: KeyRecord, endpoint: str, body: dict[str, Any]) -> None:
        """Parameters, types and sizes that need no tier (400 naming the field)."""
        try:
            check_request(endpoint, body, None, self.limits)
        except APIError as exc:
            self.metrics.rejected(key.agent, exc.status)
            raise

    # -- after routing ------------------------------------------------------------------------------------

    def admit(self, key: KeyRecord, endpoint: str, body: dict[str, Any], tier: str) -> None:
        """403 if the key may not use `tier`, 400 past its max_tokens cap, 429 over the key's limits; else the
        request is counted against the key's requests per minute."""
        try:
            check_tier(key, tier)
            check_max_tokens(endpoint, body, self.caps[tier])
            self.limiter.check(key)
        except APIError as exc:
            self.metrics.rejected(key.agent, exc.status)
            raise

    def account(self, key: KeyRecord, status: int | str, spend: Spend) -> None:
        """A finished request (any outcome) with what it used: the key's window and ledger, agent metrics."""
        self.metrics.finished(key.agent, status, spend)
        if spend.prompt_tokens or spend.completion_tokens or spend.cost_usd or status == 200:
            try:
                self.limiter.record(key, spend.prompt_tokens, spend.completion_tokens, spend.cost_usd)
            except Exception:  # a full disk must not fail a request that was already answered
                log.exception("usage of agent %s not recorded", key.agent)

    def spend(self, tier: str, provider: str, duration_s: float, prompt: int, completion: int,
              provider_cost: float) -> Spend:
        if provider == LOCAL:
            return local_spend(self.config.tiers[tier], duration_s, prompt, completion)
        return Spend(prompt, completion, provider_cost, 0.0)

    # -- usage and admin ----------------------------------------------------------------------------------

    def usage(self, key: KeyRecord) -> dict[str, Any]:
        return self.limiter.usage(key)

    def usage_all(self) -> dict[str, Any]:
        return self.limiter.usage_all(self.keys.list())


class KeySpec(BaseModel):
    """The body of `POST /admin/keys`: the options of `tierserve keys create`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    agent: str
    tiers: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: Literal["day", "month"] = "month"
    default_tier: str | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> KeySpec:
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors()) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects invalid UTF-8 here, with its own message: say which it was.
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object (got {type(body).__name__})", code="invalid_json")
    return body
