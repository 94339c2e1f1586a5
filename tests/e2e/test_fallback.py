"""Routing, overflow and the fallback providers, against real servers: the session app's providers are a bare
vLLM behind fault proxies the tests control (tests/conftest.py: peer, metered, paidapi).

The scenarios run in file order and share the providers' breaker and budget state, as production would.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import auth

LONG = "plan the deploy because the result " * 70  # ~600 estimated tokens: over the tiny tiers' 512 window
ASK = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def http(app_url: str, api_key: str) -> httpx.Client:
    with httpx.Client(base_url=app_url, timeout=120, headers=auth(api_key)) as c:
        yield c


def long_chat(**extra: object) -> dict:
    return {"model": "fast", "messages": [{"role": "user", "content": LONG}], "max_tokens": 5, **extra}


def providers(http: httpx.Client) -> dict:
    r = http.get("/health/providers")
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize(
    ("content", "tier"),
    [("please refactor this:\ndef add(a, b):\n    return a+b", "coder"),
     ("plan the architecture of a queue", "reasoning"),
     ("hello, how are you", "fast")],
)
def test_auto_routes_by_content(http: httpx.Client, content: str, tier: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": content}],
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.headers["x-tierserve-tier"] == tier
    assert r.headers["x-tierserve-provider"] == "local"
    assert r.headers["x-tierserve-route-reason"].startswith("auto:")


def test_header_pins_a_tier(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "fast", "messages": ASK, "max_tokens": 2},
                  headers={"x-tierserve-tier": "reasoning"})
    assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "reasoning"
    r = http.post("/v1/chat/completions", json={"model": "fast", "messages": ASK},
                  headers={"x-tierserve-tier": "nope"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_prompt_too_long_for_the_tier_goes_to_the_larger_window_provider(http: httpx.Client, proxies: dict) -> None:
    before = proxies["peer"].stats.requests
    r = http.post("/v1/chat/completions", json=long_chat())
    assert r.status_code == 200, r.text
    assert r.headers["x-tierserve-provider"] == "peer" and r.headers["x-tierserve-tier"] == "fast"
    assert "too-long" not in r.headers["x-tierserve-route-reason"] or "peer" in r.headers["x-tierserve-route-reason"]
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert r.json()["usage"]["completion_tokens"] > 0
    assert proxies["peer"].stats.requests == before + 1


def test_stream_cut_after_first_byte_is_an_error_event_not_a_truncated_success(
    http: httpx.Client, proxies: dict
) -> None:
    proxies["peer"].set("cut", after_chunks=2)
    try:
        with http.stream("POST", "/v1/chat/completions", json=long_chat(stream=True, max_tokens=20,
                                                                         min_tokens=20)) as r:
            assert r.status_code == 200
            assert r.headers["x-tierserve-provider"] == "peer"
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        proxies["peer"].set("pass")
    assert "[DONE]" not in events  # not passed off as a complete answer
    error = json.loads(events[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    assert any("choices" in json.loads(e) for e in events[:-1])  # the client did get the first chunks
    assert providers(http)["providers"]["peer"]["consecutive_failures"] == 1  # counted against the breaker


def test_breaker_opens_budget_skips_then_half_open_probe_closes(http: httpx.Client, proxies: dict) -> None:
    peer, metered, paid = proxies["peer"], proxies["metered"], proxies["paidapi"]
    metered_answers = metered.stats.forwarded
    peer.set("status", status=500)
    try:
        # 2nd failure of peer; the next provider (metered) serves, and its first answer spends its budget.
        r = http.post("/v1/chat/completions", json=long_chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-tierserve-provider"] == "metered"
        assert r.headers["x-tierserve-route-reason"].startswith("fallback after provider peer failed (502")
        snap = providers(http)
        assert snap["providers"]["peer"]["consecutive_failures"] == 2
        assert "metered" in json.dumps(snap["budgets"])

        # 3rd failure: the breaker opens; metered is over budget; nothing else may take it.
        r = http.post("/v1/chat/completions", json=long_chat())
        assert r.status_code in (429, 503) and int(r.headers["retry-after"]) >= 1
        assert "budget" in r.json()["error"]["message"]
        assert providers(http)["providers"]["peer"]["state"] == "open"

        # Open: peer is skipped without being contacted, and the error says why.
        seen = peer.stats.requests
        r = http.post("/v1/chat/completions", json=long_chat())
        assert r.status_code in (429, 503) and int(r.headers["retry-after"]) >= 1
        message = r.json()["error"]["message"]
        assert "breaker open" in message and "budget" in message
        assert peer.stats.requests == seen
    finally:
        peer.set("pass")

    # After the cooldown (8 s in the test config) one probe goes through, succeeds, and closes the breaker.
    # The router's view of provider states is up to a second old: until it sees half-open, a clean 503.
    time.sleep(8.5)
    deadline = time.monotonic() + 20
    while True:
        r = http.post("/v1/chat/completions", json=long_chat())
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert r.status_code in (429, 503) and int(r.headers["retry-after"]) >= 1, r.text
        time.sleep(1)
    assert r.status_code == 200 and r.headers["x-tierserve-provider"] == "peer", r.text
    state = providers(http)["providers"]["peer"]
    assert state["state"] == "closed" and state["consecutive_failures"] == 0 and state["errors"] >= 3
    assert metered.stats.forwarded - metered_answers == 1  # exactly the one answer it gave
    assert paid.stats.connections == 0  # paid use is off: never contacted


def test_64_concurrent_requests_to_a_small_queue_are_all_accounted_for(
    app_url: str, api_key: str, proxies: dict
) -> None:
    peer_before = proxies["peer"].stats.requests

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app_url, timeout=180, headers=auth(api_key)) as client:
            body = {"model": "coder", "messages": ASK, "max_tokens": 16, "min_tokens": 16}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(64)))

    responses = asyncio.run(run())
    served = {"local": 0, "peer": 0}
    rejected = 0
    for r in responses:
        if r.status_code == 200:
            served[r.headers["x-tierserve-provider"]] += 1
            assert r.json()["usage"]["completion_tokens"] == 16
        else:
            assert r.status_code in (429, 503), r.text
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
            rejected += 1
    print(f"\n[tierserve] 64 concurrent to coder (queue limit 4): local {served['local']}, "
          f"peer {served['peer']}, rejected {rejected}")
    assert served["local"] + served["peer"] + rejected == 64
    assert served["local"] >= 4 and served["peer"] >= 1  # some stayed local, some overflowed
    assert proxies["peer"].stats.requests - peer_before == served["peer"]  # none duplicated upstream
    assert proxies["paidapi"].stats.connections == 0


def test_fallback_metrics(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("tierserve_")]
    assert any(line.startswith("tierserve_fallbacks_total{") and 'tier="fast"' in line
               and float(line.rsplit(" ", 1)[1]) >= 1 for line in lines)
    assert any(line.startswith("tierserve_cost_usd_total") and 'provider="metered"' in line
               and float(line.rsplit(" ", 1)[1]) > 0.05 for line in lines)
    assert any('provider="peer"' in line and line.startswith("tierserve_requests_total") for line in lines)
