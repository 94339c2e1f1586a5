"""The provider client over real sockets: a real OpenAI-compatible server behind the fault proxy.

The fast matrix runs against tests/support/upstream.py (uvicorn, starts in < 1 s). The same client against
bare vLLM on the tiny model runs when TIERSERVE_VLLM_UPSTREAM names one (host:port, served name `up`):
starting vLLM costs minutes on a shared 2-core machine, so the suite that owns such an engine opts in.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from serving.backends.breaker import Breaker
from serving.backends.providers import Completed, Outcome, ProviderClient, Streaming, UpstreamError
from serving.config import Provider
from serving.spend.ledger import Budget
from tests.support.faultproxy import FaultProxy
from tests.support.upstream import StubUpstream

T = TypeVar("T")
KEY_ENV = {"UPSTREAM_KEY": "secret-123"}
MESSAGES = [{"role": "user", "content": "hello"}]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def upstream() -> Iterator[StubUpstream]:
    with StubUpstream(model="up-model", api_key="secret-123") as server:
        yield server


@pytest.fixture
def proxy(upstream: StubUpstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.address) as p:
        yield p


class Harness:
    """A client for one provider behind the proxy, with a real breaker and budget, recording outcomes."""

    def __init__(self, proxy: FaultProxy, tmp_path: Path, **provider: Any) -> None:
        fields = {
            "name": "up", "kind": "vllm", "base_url": proxy.url + "/v1", "api_key_env": "UPSTREAM_KEY",
            "models": {"coder": "up-model"}, "timeout_connect_s": 2, "timeout_read_s": 2, "timeout_total_s": 3,
            "price_input_per_1m_usd": 1.0, "price_output_per_1m_usd": 2.0, "retries": 2, **provider,
        }
        self.provider = Provider.model_validate(fields)
        self.breaker = Breaker("provider:up", failures=3, cooldown_s=60)
        self.budget = Budget(tmp_path / "spend.db", [self.provider], cache_s=0)
        self.outcomes: list[Outcome] = []
        self.sleeps: list[float] = []

        async def sleep(s: float) -> None:
            self.sleeps.append(s)

        self.sleep = sleep
        self.env: dict[str, str] = dict(KEY_ENV)

    def client(self) -> ProviderClient:
        """A fresh client per call: each test call runs in its own event loop, and a pool is bound to one."""
        return ProviderClient(
            self.provider, breaker=self.breaker, budget=self.budget, on_outcome=self.outcomes.append, env=self.env,
            sleep=self.sleep, rand=lambda: 0.5,
        )

    async def call(
        self, stream: bool, endpoint: str = "chat", **body: Any
    ) -> tuple[Completed | Streaming, list[bytes]]:
        payload = {"model": "coder", "messages": MESSAGES, "max_tokens": 5, **body}
        if endpoint == "completion":
            payload = {"model": "coder", "prompt": "hello", "max_tokens": 5, **body}
        client = self.client()
        try:
            answer = await client.start(
                endpoint, payload, tier="coder", stream=stream, prompt_tokens=3  # type: ignore[arg-type]
            )
            chunks = [chunk async for chunk in answer] if isinstance(answer, Streaming) else []
            return answer, chunks
        finally:
            await client.aclose()

    def spent(self) -> tuple[int, int, int, int]:
        t = self.budget.totals("provider", "up", "day")
        return t.requests, t.estimated, t.prompt_tokens, t.completion_tokens


@pytest.fixture
def h(proxy: FaultProxy, tmp_path: Path) -> Harness:
    return Harness(proxy, tmp_path)


def data_events(chunks: list[bytes]) -> list[bytes]:
    return [e for c in chunks for e in c.split(b"\n\n") if e.startswith(b"data: ")]


# -- success paths ------------------------------------------------------------------------------------


def test_non_streamed_rewrites_model_sends_key_and_accounts(h: Harness, proxy: FaultProxy) -> None:
    answer, _ = run(h.call(stream=False))
    assert isinstance(answer, Completed) and answer.status == 200 and answer.attempts == 1
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4"
    seen = proxy.stats.seen[-1]
    assert json.loads(seen.body)["model"] == "up-model" and seen.headers["authorization"] == "Bearer secret-123"
    assert h.spent() == (1, 0, 7, 5)
    assert h.budget.totals("provider", "up", "day").cost_usd == pytest.approx((7 * 1 + 5 * 2) / 1e6)
    assert h.breaker.successes == 1 and h.outcomes[-1].result == "ok"


def test_streamed_asks_for_usage_and_hides_it_from_a_client_that_did_not(h: Harness, proxy: FaultProxy) -> None:
    answer, chunks = run(h.call(stream=True))
    events = data_events(chunks)
    assert isinstance(answer, Streaming) and len(events) == 6 and events[-1] == b"data: [DONE]"
    assert all(b'"choices":[]' not in e for e in events)  # the usage-only chunk was ours
    sent = json.loads(proxy.stats.seen[-1].body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert h.spent() == (1, 0, 7, 5)  # streamed spend is real usage, not zero (LiteLLM #37923)
    asked = Harness(proxy, h.budget.path.parent / "b")
    _, chunks = run(asked.call(stream=True, stream_options={"include_usage": True}))
    assert b'"choices": []' in data_events(chunks)[-2]  # a client that asked keeps it


def test_completions_endpoint(h: Harness, proxy: FaultProxy) -> None:
    answer, _ = run(h.call(stream=False, endpoint="completion", stream_options={"include_usage": True}))
    assert isinstance(answer, Completed) and json.loads(answer.body)["choices"][0]["text"] == "w0 w1 w2 w3 w4"
    sent = json.loads(proxy.stats.seen[-1].body)
    assert proxy.stats.seen[-1].path == "/v1/completions" and "stream_options" not in sent  # vLLM would 400


# -- failures before the first byte: retried, then UpstreamError for failover -------------------------


def test_500_twice_then_success_is_retried_with_backoff(h: Harness, proxy: FaultProxy) -> None:
    proxy.set("status", status=500, times=2)
    answer, chunks = run(h.call(stream=True))
    assert isinstance(answer, Streaming) and answer.attempts == 3 and data_events(chunks)[-1] == b"data: [DONE]"
    assert proxy.stats.requests == 3 and h.sleeps == [0.125, 0.25]  # base 0.25 x 2^n x jitter 0.5
    assert h.breaker.successes == 1 and h.breaker.errors == 0  # one call, one verdict


def test_refused_connections_exhaust_retries_and_count_once(h: Harness, proxy: FaultProxy) -> None:
    proxy.set("refuse")
    with pytest.raises(UpstreamError) as info:
        run(h.call(stream=False))
    assert info.value.status == 502 and info.value.attempts == 3 and "attempts: 3" in info.value.message
    assert proxy.stats.connections == 3 and proxy.stats.requests == 0
    assert h.breaker.errors == 1 and h.breaker.consecutive_failures == 1 and h.outcomes[-1].result == "failed"
    assert h.spent()[0] == 0


def test_429_retry_after_is_honoured(h: Harness, proxy: FaultProxy) -> None:
    proxy.set("status", status=429, retry_after="1", times=1)
    answer, _ = run(h.call(stream=False))
    assert isinstance(answer, Completed) and answer.attempts == 2 and h.sleeps == [1.0]


def test_slow_upstream_hits_the_total_deadline(proxy: FaultProxy, tmp_path: Path) -> None:
    h = Harness(proxy, tmp_path, timeout_total_s=0.5, retries=5)
    proxy.set("delay", delay_s=3)
    start = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        run(h.call(stream=True))
    assert info.value.status == 504 and time.monotonic() - start < 1.5


@pytest.mark.parametrize(("mode", "k"), [("cut", 0), ("sse_error", 0)])
def test_stream_failing_before_its_first_event_is_retried(h: Harness, proxy: FaultProxy, mode: str, k: int) -> None:
    proxy.set(mode, after_chunks=k, times=1)  # type: ignore[arg-type]
    answer, chunks = run(h.call(stream=True))
    assert answer.attempts == 2 and data_events(chunks)[-1] == b"data: [DONE]"
    assert b"error" not in b"".join(chunks)


def test_client_errors_pass_through_unretried(h: Harness, proxy: FaultProxy) -> None:
    answer, _ = run(h.call(stream=True, max_tokens=5000))  # the stub's "context window" is 1000
    assert isinstance(answer, Completed) and answer.status == 400 and proxy.stats.requests == 1
    assert json.loads(answer.body)["error"]["code"] == "context_length_exceeded"
    assert h.breaker.errors == 0 and h.outcomes[-1].result == "client_error"


def test_bad_key_fails_over_without_retrying_same_provider(proxy: FaultProxy, tmp_path: Path) -> None:
    h = Harness(proxy, tmp_path)
    h.env = {"UPSTREAM_KEY": "wrong"}
    with pytest.raises(UpstreamError) as info:
        run(h.call(stream=False))
    assert proxy.stats.requests == 1 and "401" in info.value.message and h.breaker.errors == 1


def test_missing_key_or_open_breaker_never_contacts_upstream(proxy: FaultProxy, tmp_path: Path) -> None:
    h = Harness(proxy, tmp_path)
    h.env = {}
    assert h.client().key_missing
    with pytest.raises(UpstreamError, match=r"\$UPSTREAM_KEY is not set"):
        run(h.call(stream=False))
    h = Harness(proxy, tmp_path / "2")
    for _ in range(3):
        h.breaker.failure("down")
    with pytest.raises(UpstreamError, match="breaker open") as info:
        run(h.call(stream=True))
    assert info.value.headers["retry-after"] == "60"
    assert proxy.stats.connections == 0


def test_breaker_opens_after_three_failed_calls_and_half_open_probe_closes_it(
    proxy: FaultProxy, tmp_path: Path
) -> None:
    now = [0.0]
    h = Harness(proxy, tmp_path, retries=0)
    h.breaker = Breaker("provider:up", failures=3, cooldown_s=30, clock=lambda: now[0])
    proxy.set("status", status=503)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            run(h.call(stream=False))
    assert h.breaker.state == "open" and proxy.stats.requests == 3
    with pytest.raises(UpstreamError, match="breaker open"):
        run(h.call(stream=False))
    assert proxy.stats.requests == 3  # skipped, not contacted
    proxy.set("pass")
    now[0] = 31.0
    answer, _ = run(h.call(stream=True))
    assert answer.status == 200 and h.breaker.state == "closed"


# -- failures after the first byte: one in-stream error event, a breaker failure ----------------------


def test_stream_cut_after_first_bytes_ends_with_error_event(h: Harness, proxy: FaultProxy) -> None:
    proxy.set("cut", after_chunks=2)
    answer, chunks = run(h.call(stream=True))
    events = data_events(chunks)
    assert answer.attempts == 1 and proxy.stats.requests == 1  # never silently continued elsewhere
    assert len(events) == 3 and b"[DONE]" not in b"".join(events)
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_stream_error" and error["type"] == "server_error" and "up" in error["message"]
    assert h.breaker.errors == 1 and h.outcomes[-1].result == "failed"
    assert h.spent() == (1, 1, 3, 2)  # estimated: the router's prompt estimate and the chunks seen


def test_upstream_error_event_mid_stream(h: Harness, proxy: FaultProxy) -> None:
    proxy.set("sse_error", after_chunks=1)
    _, chunks = run(h.call(stream=True))
    events = data_events(chunks)
    assert len(events) == 2 and "Overloaded" in json.loads(events[1][6:])["error"]["message"]
    assert h.breaker.errors == 1


def test_stall_mid_stream_beyond_read_timeout(proxy: FaultProxy, tmp_path: Path) -> None:
    h = Harness(proxy, tmp_path, timeout_read_s=0.3)
    proxy.set("stall", after_chunks=1, delay_s=2)
    _, chunks = run(h.call(stream=True))
    events = data_events(chunks)
    assert len(events) == 2 and "stalled" in json.loads(events[1][6:])["error"]["message"]


def test_client_abandoning_a_stream_releases_the_probe(h: Harness) -> None:
    now = [0.0]
    h.breaker = Breaker("provider:up", failures=3, cooldown_s=30, clock=lambda: now[0])
    for _ in range(3):
        h.breaker.failure("down")
    now[0] = 30.0
    assert h.breaker.state == "half_open"

    async def abandon() -> None:
        client = h.client()
        answer = await client.start("chat", {"model": "coder", "messages": MESSAGES}, tier="coder", stream=True)
        assert isinstance(answer, Streaming)
        assert not h.breaker.available()  # this call holds the probe
        await answer.aclose()
        await client.aclose()

    run(abandon())
    assert h.outcomes[-1].result == "cancelled" and h.breaker.available()
