"""The external-API fallback deployment: forwards requests to the providers in models.yaml (OpenAI,
Anthropic, DigitalOcean Gradient, Ollama, vLLM, another tierserve), each behind its own circuit breaker and
budget, on every endpoint a provider lists (OpenAI's chat, completion, responses and embeddings, Anthropic's
messages and count_tokens), in that endpoint's own protocol.

It is a backend like a tier (serving/wire/backend.py): a `Call` whose `target` names the provider, answered
by one `Result` (errors in our envelope, whatever the upstream's protocol), or by a stream of SSE bytes in
the endpoint's protocol followed by a `Usage` with the provider's cost.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serving.backends.breaker import BreakerRegistry
from serving.backends.providers import Completed, ProviderClient, UpstreamError
from serving.config import AppConfig
from serving.security.redaction import redact_replica_logs
from serving.spend.ledger import Budget
from serving.wire.errors import APIError, retry_after
from serving.wire.items import Call, ProviderState, Result, StreamItem, Usage

log = logging.getLogger(__name__)


class FallbackServer:
    """Plain class; `serving.app` wraps it with `serve.deployment` (one replica: breakers and budgets
    are this process's state, persisted in SQLite)."""

    def __init__(self, config: AppConfig, state_dir: str) -> None:
        redact_replica_logs()  # provider API keys in an upstream's error text never reach the log
        self.breakers = BreakerRegistry.from_config(config.routing.breaker)
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.budget = Budget.from_config(Path(state_dir) / "budget.sqlite", config)
        self.clients = {
            p.name: ProviderClient(p, breaker=self.breakers.get(p.name), budget=self.budget) for p in config.providers
        }

    def states(self) -> dict[str, ProviderState]:
        """What the router needs per provider: breaker and budget."""
        out = {}
        for name in self.clients:
            breaker = self.breakers.get(name)
            out[name] = ProviderState(
                available=breaker.available(),
                retry_in_s=breaker.retry_in_s(),
                over_budget=self.budget.over_budget(name),
                budget_reset_in_s=self.budget.reset_in_s(name),
            )
        return out

    def snapshot(self) -> dict[str, Any]:
        """`GET /health/providers`: breaker state and spend per provider."""
        return {"providers": self.breakers.snapshot(), "budgets": self.budget.snapshot()}

    def _priced(self, provider: str, usage: Usage) -> Usage:
        return dataclasses.replace(usage, cost_usd=self.budget.cost(provider, usage.prompt_tokens,
                                                                    usage.completion_tokens))

    def _refuse(self, call: Call) -> Result | None:
        """A call this provider must not get. The router skips providers that don't serve the endpoint or tier
        (this is a safety net), but its view of budgets may be a second old: this check is the one that counts."""
        provider = call.target
        client = self.clients.get(provider)
        why = f"unknown provider {provider!r}" if client is None else client.refusal(call.endpoint, call.tier)
        if why is not None:
            return Result.error(APIError(503, why, code="provider_unsupported"), failover=True)
        why = self.budget.over_budget(provider)
        if why is None:
            return None
        reset = self.budget.reset_in_s(provider)
        error = APIError(429, why, code="budget_exceeded", headers=retry_after(60 if reset is None else reset))
        return Result.error(error, failover=True)

    async def complete(self, call: Call) -> Result:
        provider = call.target
        if (refused := self._refuse(call)) is not None:
            return refused
        try:
            answer = await self.clients[provider].start(
                call.endpoint, call.body, tier=call.tier, stream=False, prompt_tokens=call.prompt_tokens
            )
        except UpstreamError as exc:
            return Result.error(exc, failover=True)
        assert isinstance(answer, Completed)
        return Result(answer.status, answer.body, self._priced(provider, answer.usage or Usage()))

    async def stream(self, call: Call) -> AsyncIterator[StreamItem]:
        provider = call.target
        if (refused := self._refuse(call)) is not None:
            yield refused
            return
        try:
            answer = await self.clients[provider].start(
                call.endpoint, call.body, tier=call.tier, stream=True, prompt_tokens=call.prompt_tokens
            )
        except UpstreamError as exc:
            yield Result.error(exc, failover=True)
            return
        if isinstance(answer, Completed):  # the upstream refused the request itself (400/413/422)
            yield Result(answer.status, answer.body)
            return
        try:
            async for chunk in answer:
                yield chunk
        finally:
            await answer.aclose()  # a client that went away closes the upstream too
        if answer.usage is not None and not answer.usage.estimated:
            yield self._priced(provider, answer.usage)
