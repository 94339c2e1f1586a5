"""A tier's engine dies: requests get a 5xx in the error envelope (never a hang), and the tier comes back.

`reasoning` is embedded in the ingress replica (tests/conftest.py): its engine is replaced in place, and the
gateway keeps serving the other tiers meanwhile. `coder` is a deployment of its own, replaced by Ray Serve.
"""

from __future__ import annotations

import signal
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.conftest import auth, engine_core_follows_its_worker, engine_core_under, replica_process

BODY = {"model": "reasoning", "prompt": "hello", "max_tokens": 4, "min_tokens": 4}


@pytest.mark.disruptive
def test_embedded_engine_death_is_a_5xx_then_it_is_replaced_in_place(app_url: str, api_key: str) -> None:
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(api_key)) as http:
        assert http.post("/v1/completions", json=BODY).status_code == 200
        ingress = replica_process("ingress")
        dead = engine_core_under("ingress")
        dead.send_signal(signal.SIGKILL)

        # Until Serve replaces the replica, every answer is a prompt, enveloped 5xx (or already 200 again).
        statuses = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                r = http.post("/v1/completions", json=BODY)
            except httpx.TimeoutException:
                pytest.fail("a request to the broken tier hung for 60 s")
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (500, 503), r.text
            error = r.json()["error"]
            assert error["type"] == "server_error" and isinstance(error["code"], str)
            assert time.monotonic() - started < 30
            # The gateway stays up meanwhile: the tiers that are deployments of their own still answer.
            other = http.post("/v1/completions", json={**BODY, "model": "fast"})
            assert other.status_code == 200, other.text
            time.sleep(2)
        assert statuses[0] in (500, 503), statuses  # the failure was seen, not hidden
        assert statuses[-1] == 200, f"tier did not recover in 300 s: {statuses[-5:]}"
        print(f"\n[tierserve] embedded engine killed: {len(statuses)} requests until it answered again")

        # A new engine in the same ingress process: the replica was not replaced, nothing else restarted.
        assert replica_process("ingress").pid == ingress.pid
        assert engine_core_under("ingress").pid != dead.pid
        assert http.get("/health/ready").status_code == 200
        for tier in ("coder", "fast"):
            assert http.post("/v1/completions", json={**BODY, "model": tier}).status_code == 200


@pytest.mark.disruptive
def test_readiness_fails_when_a_replica_dies_and_recovers(app_url: str, api_key: str) -> None:
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(api_key)) as http:
        assert http.get("/health/ready").status_code == 200
        # A stored response made by the replica about to die: its conversation must outlive it.
        first = http.post("/v1/responses", json={"model": "coder", "input": "remember blue", "max_output_tokens": 4})
        assert first.status_code == 200 and first.headers["x-tierserve-provider"] == "local", first.text
        replica_process("tier-coder").send_signal(signal.SIGKILL)
        seen = []
        served_by = []
        continued: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = http.get("/health/ready")
            state = r.json()["tiers"]["coder"]["state"]
            seen.append((r.status_code, state))
            if state == "failing":  # meanwhile agents still get answers: the fallback provider serves
                chat = http.post("/v1/chat/completions", json={"model": "coder", "max_tokens": 3,
                                                                "messages": [{"role": "user", "content": "hi"}]})
                assert chat.status_code == 200, chat.text
                served_by.append(chat.headers["x-tierserve-provider"])
                if not continued:
                    continued.append(_continue(http, first.json()["id"]))
                    # No provider speaks Anthropic's Messages here: a 503 in Anthropic's shape, saying why.
                    msg = http.post("/v1/messages", json={"model": "coder", "max_tokens": 3,
                                                          "messages": [{"role": "user", "content": "hi"}]})
                    assert msg.status_code == 503 and "retry-after" in msg.headers, msg.text
                    assert msg.json()["type"] == "error", msg.text
                    assert "provider:peer: does not speak messages" in msg.json()["error"]["message"]
            if seen[-1] == (200, "ready") and (503, "failing") in seen:
                break
            time.sleep(2)
        assert (503, "failing") in seen, seen[:5]
        print(f"\n[tierserve] coder replica killed: served by {served_by} while it was replaced; the stored "
              f"response continued on {continued}")
        assert "peer" in served_by
        assert seen[-1] == (200, "ready"), seen[-5:]
        engine_core_follows_its_worker("tier-coder")  # the replacement's engine is placed like the first
        assert http.post("/v1/completions", json={**BODY, "model": "coder"}).status_code == 200
        assert _continue(http, first.json()["id"]) == "local"  # and on the new replica


def _continue(http: httpx.Client, previous: str) -> str:
    """Continue a stored response; the provider that answered (the conversation lives in tierserve)."""
    r = http.post("/v1/responses", json={"model": "coder", "input": "which colour?", "max_output_tokens": 4,
                                         "previous_response_id": previous})
    assert r.status_code == 200, r.text
    assert r.json()["previous_response_id"] == previous
    return r.headers["x-tierserve-provider"]


@pytest.mark.disruptive
def test_stored_responses_outlive_an_ingress_restart(app_url: str, api_key: str) -> None:
    """The ingress replica is killed and Ray Serve starts a new one (a new process, the embedded tier's engine
    included): the responses stored before are still there, for the same key, from tierserve's state."""
    port = urlparse(app_url).port
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(api_key)) as http:
        first = http.post("/v1/responses", json={"model": "fast", "input": "remember blue", "max_output_tokens": 4})
        assert first.status_code == 200, first.text
    # The new replica binds the public port again, which a connection still closing on it would block
    # (server-side TIME_WAIT): let every connection to it end first (ours closed from the client's side).
    deadline = time.monotonic() + 120
    while _connections_on(port) and time.monotonic() < deadline:
        time.sleep(2)
    ingress = replica_process("ingress")
    ingress.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 300
    answer = None
    while time.monotonic() < deadline:
        time.sleep(3)
        try:
            answer = httpx.get(f"{app_url}/v1/responses/{first.json()['id']}", headers=auth(api_key), timeout=30)
        except httpx.HTTPError:
            continue
        if answer.status_code != 503:
            break
    assert answer is not None and answer.status_code == 200, answer.text if answer is not None else "no answer"
    assert replica_process("ingress").pid != ingress.pid
    assert answer.json()["output"] == first.json()["output"]
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(api_key)) as http:
        r = http.post("/v1/responses", json={"model": "fast", "input": "which colour?", "max_output_tokens": 4,
                                             "previous_response_id": first.json()["id"]})
        assert r.status_code == 200, r.text
        assert r.json()["previous_response_id"] == first.json()["id"]
        assert r.json()["usage"]["input_tokens"] > first.json()["usage"]["input_tokens"]


def _connections_on(port: int | None) -> list[str]:
    return [c.status for c in psutil.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN]
