"""The external-API fallback deployment: forwards OpenAI-compatible requests to the providers in
models.yaml (OpenAI, Anthropic's compatible endpoint, DigitalOcean Gradient, Ollama, vLLM, another
tierserve), each behind its own circuit breaker and budget.

It speaks the same item protocol as a tier replica, so the ingress relays both alike: a stream is an
error Result alone, or SSE bytes followed by a Usage; a non-streamed answer is one Result. A Result with
`failover=True` means no answer was started: the ingress may try its next candidate (Envoy's rule).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serving.backends.breaker import BreakerRegistry
from serving.backends.providers import Completed, Outcome, ProviderClient, UpstreamError
from serving.backends.tier import Result, Usage
from serving.config import AppConfig
from serving.gateway.router import ProviderState
from serving.security.redaction import redact_replica_logs
from serving.spend.ledger import Budget
from serving.wire.errors import APIError

log = logging.getLogger(__name__)

# The outcome of the provider call made by the current request (set per request, read after the stream).
_outcomes: contextvars.ContextVar[list[Outcome]] = contextvars.ContextVar("tierserve_outcomes")


class FallbackServer:
    """Plain class; `serving.app` wraps it with `serve.deployment` (one replica: breakers and budgets
    are this process's state, persisted in SQLite)."""

    def __init__(self, config: AppConfig, state_dir: str) -> None:
        redact_replica_logs()  # provider API keys in an upstream's error text never reach the log
        self.breakers = BreakerRegistry.from_config(config.routing.breaker)
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self.budget = Budget.from_config(Path(state_dir) / "budget.sqlite", config)
        self.prices = {p.name: p for p in config.providers}
        self.clients = {
            p.name: ProviderClient(
                p, breaker=self.breakers.provider(p.name), budget=self.budget, on_outcome=self._outcome
            )
            for p in config.providers
        }

    @staticmethod
    def _outcome(outcome: Outcome) -> None:
        sink = _outcomes.get(None)
        if sink is not None:
            sink.append(outcome)

    def states(self) -> dict[str, ProviderState]:
        """What the router needs per provider: breaker and budget."""
        out = {}
        for name in self.clients:
            breaker = self.breakers.provider(name)
            out[name] = ProviderState(
                available=breaker.available(),
                retry_in_s=breaker.retry_in_s(),
                over_budget=self.budget.over_budget(name),
                budget_reset_in_s=self.budget.reset_in_s(name),
            )
        return out

    def snapshot(self) -> dict[str, Any]:
        return {**self.breakers.snapshot(), "budgets": self.budget.snapshot()}

    def cost(self, provider: str, usage: Usage) -> float:
        return self.budget.cost(provider, usage.prompt_tokens, usage.completion_tokens)

    def _refuse(self, provider: str) -> Result | None:
        """The router's view of budgets may be a second old; this check, at the source, is the one that counts."""
        why = self.budget.over_budget(provider)
        if why is None:
            return None
        reset = self.budget.reset_in_s(provider)
        return _failover(APIError(429, why, code="budget_exceeded", headers={"retry-after": str(round(reset or 60))}))

    async def complete(
        self, provider: str, endpoint: str, body: dict[str, Any], tier: str, prompt_tokens: int = 0
    ) -> Result:
        if (refused := self._refuse(provider)) is not None:
            return refused
        try:
            answer = await self.clients[provider].start(
                endpoint, body, tier=tier, stream=False, prompt_tokens=prompt_tokens  # type: ignore[arg-type]
            )
        except UpstreamError as exc:
            return _failover(exc)
        assert isinstance(answer, Completed)
        usage = answer.usage
        result = Result(answer.status, answer.body, usage.prompt_tokens if usage else 0,
                        usage.completion_tokens if usage else 0)
        result.cost_usd = self.cost(provider, Usage(result.prompt_tokens, result.completion_tokens))
        return result

    async def stream(
        self, provider: str, endpoint: str, body: dict[str, Any], tier: str, prompt_tokens: int = 0
    ) -> AsyncIterator[bytes | Result | Usage]:
        if (refused := self._refuse(provider)) is not None:
            yield refused
            return
        sink: list[Outcome] = []
        _outcomes.set(sink)
        try:
            answer = await self.clients[provider].start(
                endpoint, body, tier=tier, stream=True, prompt_tokens=prompt_tokens  # type: ignore[arg-type]
            )
        except UpstreamError as exc:
            yield _failover(exc)
            return
        if isinstance(answer, Completed):  # the upstream refused the request itself (400/413/422)
            yield Result(answer.status, answer.body)
            return
        try:
            async for chunk in answer:
                yield chunk
        finally:
            await answer.aclose()  # a client that went away closes the upstream too
        used = next((o.usage for o in reversed(sink) if o.usage), None)
        if used is not None and not used.estimated:
            usage = Usage(used.prompt_tokens, used.completion_tokens)
            usage.cost_usd = self.cost(provider, usage)
            yield usage


def _failover(exc: APIError) -> Result:
    result = Result.error(exc)
    result.failover = True
    result.retry_after = exc.headers.get("retry-after")
    return result
