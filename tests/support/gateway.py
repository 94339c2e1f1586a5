"""The gateway's parts built for unit tests: a config, a key store, accounting, and in-memory fake backends.

The fakes implement the backend interface (serving/wire/backend.py) from scripts of what to return, so the
dispatcher's and admission's behaviour is tested without Ray or an engine; the e2e suite runs the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from serving.config import AppConfig, build_config
from serving.gateway.accounting import Accounting
from serving.ops.metrics import AgentMetrics, RequestMetrics
from serving.security.keys import KeyStore
from serving.security.quotas import Limiter
from serving.spend.ledger import Budget
from serving.wire.items import Call, Result, StreamItem, Usage
from tests.support.clock import Clock

TINY = {"tiny_seed": 1}


def gateway_config(**overlay: Any) -> AppConfig:
    """Two tiers (fast, coder) and one free provider (peer) that serves both."""
    data: dict[str, Any] = {
        "tiers": {
            "fast": {"served_name": "tiny-fast", "model": TINY, "cost_per_hour_usd": 36.0, "max_tokens_cap": 64},
            "coder": {"served_name": "tiny-coder", "model": TINY, "aliases": ["code"]},
        },
        "providers": [{"name": "peer", "base_url": "http://127.0.0.1:9/v1", "default_model": "m",
                       "price_input_per_1m_usd": 1.0, "price_output_per_1m_usd": 2.0}],
        "routing": {"default_tier": "fast"},
    }
    data.update(overlay)
    return build_config(data, None)


@dataclass
class Parts:
    config: AppConfig
    registry: CollectorRegistry
    keys: KeyStore
    limiter: Limiter
    accounting: Accounting
    clock: Clock

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def gateway_parts(tmp_path: Path, config: AppConfig | None = None) -> Parts:
    config = config or gateway_config()
    registry = CollectorRegistry()
    clock = Clock()
    keys = KeyStore(tmp_path / "keys.json", clock)
    limiter = Limiter(clock=clock, ledger=Budget(tmp_path / "usage.db", config.providers, clock=clock, cache_s=0))
    accounting = Accounting(config.tiers, RequestMetrics(registry), AgentMetrics(registry), limiter, clock=clock)
    return Parts(config, registry, keys, limiter, accounting, clock)


def http_request(body: bytes, headers: dict[str, str] | None = None) -> Request:
    """A Starlette request as the ingress receives it, its body arriving in one piece."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}, receive)


Step = Result | bytes | Usage | BaseException | Callable[[], Any]


@dataclass
class FakeBackend:
    """Answers each call with the next script: a Result (non-streamed), or a list of stream steps, where an
    exception is raised at that point and `HANG` never arrives. Records every call and every cancel."""

    scripts: list[Any] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    cancelled: int = 0

    def _next(self, call: Call) -> Any:
        self.calls.append(call)
        return self.scripts.pop(0)

    async def complete(self, call: Call) -> Result:
        script = self._next(call)
        if script is HANG:
            await asyncio.Event().wait()
        if isinstance(script, BaseException):
            raise script
        assert isinstance(script, Result)
        return script

    def stream(self, call: Call) -> FakeStream:
        return FakeStream(self, list(self._next(call)))


HANG = object()


class FakeStream:
    def __init__(self, backend: FakeBackend, steps: list[Any]) -> None:
        self.backend = backend
        self.steps = steps

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self

    async def __anext__(self) -> StreamItem:
        if not self.steps:
            raise StopAsyncIteration
        step = self.steps.pop(0)
        if step is HANG:
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        item: StreamItem = step
        return item

    def cancel(self) -> None:
        self.backend.cancelled += 1
