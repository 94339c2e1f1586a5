"""The fault proxy itself, in front of a real (stub) OpenAI-compatible server: every mode does what it says."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.upstream import StubUpstream

CHAT = {"model": "up", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}


@pytest.fixture(scope="module")
def upstream() -> Iterator[StubUpstream]:
    with StubUpstream() as server:
        yield server


@pytest.fixture
def proxy(upstream: StubUpstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.address) as p:
        yield p


def events(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_pass_streams_everything_and_counts(proxy: FaultProxy) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        with client.stream("POST", "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k"}) as r:
            assert r.status_code == 200
            got = events(r)
        plain = client.post("/v1/completions", json={"model": "up", "prompt": "x", "max_tokens": 2})
    assert len(got) == 6 and got[-1] == "data: [DONE]"
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 2
    assert (proxy.stats.requests, proxy.stats.forwarded, proxy.stats.faults) == (2, 2, 0)
    assert proxy.stats.connections >= 1
    assert proxy.stats.seen[0].headers["authorization"] == "Bearer k"
    assert json.loads(proxy.stats.seen[0].body)["model"] == "up"


def test_refuse_closes_without_answer_and_times_counts_down(proxy: FaultProxy) -> None:
    proxy.set("refuse", times=2)
    for _ in range(2):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # EOF or reset: no response either way
            httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": False})
    assert httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": False}).status_code == 200
    assert (proxy.stats.connections, proxy.stats.requests, proxy.stats.faults) == (3, 1, 2)


def test_status_answers_openai_error_without_contacting_upstream(proxy: FaultProxy) -> None:
    proxy.set("status", status=429, retry_after="7")
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert proxy.stats.forwarded == 0


def test_delay_holds_the_request(proxy: FaultProxy) -> None:
    proxy.set("delay", delay_s=0.5)
    start = time.monotonic()
    assert httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": False}).status_code == 200
    assert time.monotonic() - start >= 0.5
    proxy.set("delay", delay_s=5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=httpx.Timeout(5, read=0.3))


@pytest.mark.parametrize("k", [0, 2])
def test_cut_after_k_events_breaks_the_body(proxy: FaultProxy, k: int) -> None:
    proxy.set("cut", after_chunks=k)
    got: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked body, not a clean end
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
    assert len(got) == k and "[DONE]" not in "".join(got)


def test_stall_pauses_mid_stream(proxy: FaultProxy) -> None:
    proxy.set("stall", after_chunks=1, delay_s=0.4)
    stamps = []
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=CHAT) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.monotonic())
    assert len(stamps) == 6 and stamps[1] - stamps[0] >= 0.35


def test_sse_error_event(proxy: FaultProxy) -> None:
    proxy.set("sse_error", after_chunks=1)
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=CHAT) as r:
        got = events(r)
    assert len(got) == 2 and json.loads(got[1][6:])["error"]["message"] == "Overloaded"
