"""Priority classes come from the key, never from the body: a client's own `priority` is refused by name, and a
batch key's requests hold at most their tier's batch slots (`slots.batch_per_replica`) while an interactive
key's go straight through.

`spare` lets a batch key hold two requests (tests/conftest.py). Six batch streams are sent while it is scaled to
zero, so all six reach the gateway during its cold start, whatever the machine's load: two take the slots and
wait for the engine, the four others wait in the gateway for a slot and their route reason says so. An
interactive stream sent meanwhile waits for the cold start only, never for a batch slot. Afterwards the
gateway's gauges show every slot given back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx

from serving.config import load_config
from tests.conftest import App, auth, create_key
from tests.e2e.test_telemetry import scrape, tier_state, value, wait_for

TIER = "spare"
BATCH_TOKENS = 128
BATCH_STREAMS = 6  # three rounds of two
SENT_S = 1.0  # then the interactive request: during the cold start
TIMEOUT_S = 240


@dataclass
class Stream:
    sent: float
    first: float | None = None  # the first chunk with a choice: the engine has scheduled the request
    last: float | None = None  # the last chunk with a choice (before the usage and [DONE])
    done: bool = False
    status: int | None = None
    served_by: str | None = None
    reason: str = ""
    error: str | None = None


def start(base: str, key: str, max_tokens: int, threads: list[threading.Thread]) -> Stream:
    stream = Stream(sent=time.monotonic())
    body = {"model": TIER, "prompt": "count to a thousand", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}

    def run() -> None:
        try:
            with httpx.Client(base_url=base, headers=auth(key), timeout=TIMEOUT_S) as client, \
                    client.stream("POST", "/v1/completions", json=body) as r:
                stream.status, stream.served_by = r.status_code, r.headers.get("x-tierserve-provider")
                stream.reason = r.headers.get("x-tierserve-route-reason", "")
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        stream.done = True
                    elif line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                        stream.last = time.monotonic()
                        stream.first = stream.first or stream.last
        except Exception as exc:  # reported by the assertions, with the others' outcomes
            stream.error = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    threads.append(thread)
    return stream


def test_a_batch_key_holds_at_most_its_slots_and_an_interactive_key_goes_straight_through(app: App) -> None:
    cap = load_config(app.config, "test").tiers[TIER].slots.batch_per_replica
    assert cap == 2
    batch = create_key(app.env, app.config, "--agent", "nightly-docs", "--priority", "batch")
    interactive = create_key(app.env, app.config, "--agent", "coding-agent", "--priority", "interactive")
    with httpx.Client(base_url=app.url, headers=auth(app.key), timeout=60) as http:
        wait_for(lambda: tier_state(http, TIER)["state"] == "cold", 180)  # scaled to zero (if a test woke it)
    threads: list[threading.Thread] = []
    streams = [start(app.url, batch, BATCH_TOKENS, threads) for _ in range(BATCH_STREAMS)]
    time.sleep(SENT_S)
    urgent = start(app.url, interactive, 8, threads)
    for thread in threads:
        thread.join(TIMEOUT_S + 10)
    everyone = [*streams, urgent]
    assert all(s.error is None and s.status == 200 and s.served_by == "local" and s.done for s in everyone), everyone
    assert all(s.first is not None and s.last is not None for s in everyone), everyone
    # The ones past the cap waited in the gateway for a batch slot, and said so; the interactive one did not.
    waited = [s for s in streams if "for a batch slot" in s.reason]
    assert len(waited) == BATCH_STREAMS - cap and "batch slot" not in urgent.reason, [s.reason for s in everyone]
    assert "cold" in urgent.reason, urgent.reason  # it waited for the engine like everyone, and for nothing else
    with httpx.Client(base_url=app.url, headers=auth(app.key), timeout=30) as http:
        samples = scrape(http)
    gauges = [value(samples, f"tierserve_batch_slots_{g}", tier=TIER) for g in ("in_use", "waiting")]
    assert gauges == [0, 0], gauges  # every slot given back, nobody left waiting


def test_a_client_cannot_set_its_own_priority(app_url: str, api_key: str) -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "me first"}], "max_tokens": 2,
            "priority": -100}
    with httpx.Client(base_url=app_url, headers=auth(api_key), timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "priority"
