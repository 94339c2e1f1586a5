"""Routing across a tier's replicas on a real `tierserve up` of its own: one tier of two replicas with session
routing (serving/backends/replica_router.py). Each conversation's turns land on one replica (the
`x-tierserve-replica` header), the sessions spread over both, a session whose replica is overloaded is load
balanced instead (the engines' own running counts), and when a replica dies its sessions move to the other
while the other's stay.

It starts its own app (two engines): marked `bench`, so it runs before the shared app starts and never beside
it (tests/benchmarks/conftest.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import servers
from tests.support.measure import measured

pytestmark = pytest.mark.bench

TIER = "pair"
SESSIONS = 16
MAX_IMBALANCE = 2


def config() -> dict:
    engine = {"max_model_len": 512, "dtype": "float32", "enforce_eager": True, "max_num_seqs": 16,
              "quantization": None}
    resources = {"gpus": 0, "cpus": 0.5, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    tier = {"served_name": "tiny-pair", "model": {"tiny_seed": 1}, "engine": engine, "resources": resources,
            "replicas": {"min": 2, "max": 2, "routing": "session", "max_imbalance": MAX_IMBALANCE}}
    return {"version": 1, "ingress": {"cpus": 0.25}, "tiers": {TIER: tier}, "routing": {"default_tier": TIER},
            "profiles": {"bench": {}}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    workdir = tmp_path_factory.mktemp("pair")
    server, _ = servers.tierserve_from(lambda _features: config(), "tiny-pair", workdir, False)
    server.model = TIER
    server.start()
    try:
        servers.wait_ready([server], 600)
        yield server
    finally:
        problems = server.stop()
        assert not [p for p in problems if "outlived" in p], problems


def turn(http: httpx.Client, messages: list[dict], max_tokens: int = 4) -> httpx.Response:
    return http.post("/chat/completions", json={"model": TIER, "messages": messages, "max_tokens": max_tokens,
                                                "temperature": 0})


def opening(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": f"task {i}: fix the failing test in module_{i}.py"}]


def replicas_of_sessions(http: httpx.Client, turns: int) -> dict[int, set[str]]:
    """Each session's conversation, `turns` turns long (each resends the growing history): the replicas
    that answered each session."""
    seen: dict[int, set[str]] = {}
    for i in range(SESSIONS):
        messages = opening(i)
        for t in range(turns):
            r = turn(http, messages)
            assert r.status_code == 200, r.text
            seen.setdefault(i, set()).add(r.headers["x-tierserve-replica"])
            messages = [*messages, {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                        {"role": "user", "content": f"step {t}: now run the tests"}]
    return seen


def generated_per_replica(http: httpx.Client, replicas: int = 2, timeout_s: float = 60) -> dict[str, float]:
    """Tokens each replica's engine has generated so far (vLLM's own counter, per replica). The scrape leaves
    out a replica that did not answer its fan-out in time, so it is read again until every replica is in."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = http.get(str(http.base_url).removesuffix("/v1/") + "/metrics").text
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vllm:generation_tokens_total" and s.labels.get("tier") == TIER:
                    found[s.labels["replica"]] = found.get(s.labels["replica"], 0) + s.value
        if len(found) >= replicas or time.monotonic() > deadline:
            return found
        time.sleep(1)


def client(server: servers.Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url + "/", timeout=120, trust_env=False,
                        headers={"authorization": f"Bearer {server.api_key}"})


def test_a_sessions_turns_stay_on_one_replica_and_sessions_spread(pair: servers.Server) -> None:
    with client(pair) as http:
        deadline = time.monotonic() + 300  # both replicas must be up: the app is ready when one answers
        while len(set().union(*replicas_of_sessions(http, 1).values())) < 2 and time.monotonic() < deadline:
            time.sleep(3)
        seen = replicas_of_sessions(http, 3)
    assert all(len(r) == 1 for r in seen.values()), seen  # every turn of a session on one replica
    per_replica: dict[str, int] = {}
    for (replica,) in seen.values():
        per_replica[replica] = per_replica.get(replica, 0) + 1
    assert len(per_replica) == 2, per_replica  # sixteen sessions, both replicas
    measured(f"[routing] {SESSIONS} sessions x 3 turns on 2 replicas: each on one replica, split "
             f"{sorted(per_replica.values())}")


def test_an_overloaded_replica_sheds_its_session(pair: servers.Server) -> None:
    tokens = 400  # the tiny model is fast: streams sent together, each long enough to overlap the others
    count = 3 * MAX_IMBALANCE + 2
    with client(pair) as http:
        body = {"model": TIER, "messages": opening(99), "max_tokens": tokens, "min_tokens": tokens, "stream": True}
        statuses: list[int] = []
        spans: list[tuple[float, float]] = []  # each stream's start and end: did they overlap?
        together = threading.Barrier(count)

        def stream() -> None:
            with client(pair) as own:
                together.wait()
                start = time.monotonic()
                with own.stream("POST", "chat/completions", json=body) as r:
                    statuses.append(r.status_code)
                    for _ in r.iter_bytes():
                        pass
                spans.append((start, time.monotonic()))

        before = generated_per_replica(http)
        threads = [threading.Thread(target=stream) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        after = generated_per_replica(http)
    assert statuses == [200] * len(threads)
    streams = {replica: round((after[replica] - before.get(replica, 0)) / tokens) for replica in after}
    # One session's streams: without shedding all would run on its replica.
    first_end = min(end for _, end in spans)
    assert sum(streams.values()) == len(threads) and min(streams.values()) >= 1, (
        streams, before, after, f"{sum(start < first_end for start, _ in spans)} streams began before one ended")
    measured(f"[routing] {len(threads)} streams of one session, max_imbalance {MAX_IMBALANCE}: streams per "
             f"replica {sorted(streams.values())}")


def replica_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:tierserve:tier-{TIER}" in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_dead_replicas_sessions_move_and_the_others_stay(pair: servers.Server) -> None:
    with client(pair) as http:
        before = {i: next(iter(r)) for i, r in replicas_of_sessions(http, 1).items()}
        victims = replica_processes()
        assert len(victims) == 2, victims
        os.kill(victims[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        after: dict[int, str] = {}
        failures = 0
        while len(after) < SESSIONS and time.monotonic() - killed_at < 120:
            for i in range(SESSIONS):
                if i in after:
                    continue
                r = turn(http, opening(i))
                if r.status_code == 200:
                    after[i] = r.headers["x-tierserve-replica"]
                else:
                    failures += 1
                    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            time.sleep(0.5)
        moved_s = time.monotonic() - killed_at
    assert len(after) == SESSIONS, after
    survivors = set(after.values())
    assert len(survivors) == 1 and survivors <= set(before.values()), (before, after)  # all on the one left
    (survivor,) = survivors
    stayed = [i for i in before if before[i] == survivor]
    moved = [i for i in before if before[i] != survivor]
    assert stayed and moved and all(after[i] == survivor for i in stayed)
    measured(f"[routing] replica killed: {len(moved)} sessions moved, {len(stayed)} stayed, all answered "
             f"{moved_s:.1f}s after the kill ({failures} 503s with Retry-After meanwhile)")

