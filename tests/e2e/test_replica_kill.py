"""No request waits for a dead replica: a tier's process dies under a bounded load, and every request is accounted.

Each scenario sends N chat completions (half streamed) at C at a time to one tier and kills part of it mid-load:
coder's Serve replica (SIGKILL) with the peer provider taking over, the same with every provider refusing, coder's
engine core alone, and the engine embedded in the ingress (`reasoning`, which has no provider). Every request
ends one of four ways, and the test counts them: a complete answer (a finish_reason, and `[DONE]` for a stream),
a 503 with Retry-After, a stream that had started and ends with the SSE error event, or (an embedded tier with
no provider) a prompt 5xx in the error envelope. None is truncated silently, none is served twice (the peer's
fault proxy counts what reached the upstream), and none waits more than FAILOVER_S past the kill before it is
answered, refused or in a live provider's hands (the fault proxy notes when each arrived). The counts are printed
for the closing note's before/after.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from tests.conftest import auth, engine_core_under, replica_process
from tests.support.faultproxy import FaultProxy
from tests.support.measure import measured

# At most coder's overflow limit in flight (max_queue_per_replica 4 in the test profile): every request would go to
# the tier, so where each one ends up is the failure's doing, not saturation's.
N, CONCURRENCY, MAX_TOKENS = 64, 4, 64
KILL_AFTER_S = 2.0  # into the load: requests are in flight and queued on the tier
FAILOVER_S = 3.0  # the slowest a request may be past the kill when another target can take it
RECOVER_S = 300
PROMPT_END = " say something"


@dataclass
class Outcome:
    index: int
    streamed: bool
    started: float
    ended: float = 0.0
    status: int = 0
    provider: str = ""
    reason: str = ""
    kind: str = ""  # complete | refused (429/503 with Retry-After) | error_event | error_5xx | broken
    detail: str = ""
    retry_after: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    killed_at: float = 0.0
    handed_over: dict[int, float] = field(default_factory=dict)  # request index -> when a provider had it

    def count(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    def providers(self) -> Counter[str]:
        return Counter(o.provider or "-" for o in self.outcomes if o.kind == "complete")

    def waits(self) -> list[tuple[float, Outcome]]:
        """How long each request ending past the kill waited, from the kill (or its start if later), until it was
        settled: answered, refused, or handed to a live provider. A provider's own speed is not the wait: the
        replacement engine starting on the same cores slows the peer down, and the answer is already on its way.
        """
        waits = []
        for o in self.outcomes:
            if o.ended > self.killed_at:
                settled = self.handed_over.get(o.index, o.ended) if o.provider != "local" else o.ended
                waits.append((settled - max(o.started, self.killed_at), o))
        return sorted(waits, key=lambda w: w[0], reverse=True)

    def slowest_after_kill(self) -> float:
        waits = self.waits()
        return waits[0][0] if waits else 0.0

    def summary(self, name: str) -> str:
        waits = self.waits()
        slow = [round(w, 2) for w, _ in waits[:5]]
        reasons = Counter(o.reason.split("->")[0] for o in self.outcomes if o.reason)
        refusals = Counter(o.detail[:160] for o in self.outcomes if o.kind == "refused")
        how = [(o.kind, o.provider, round(o.ended - max(o.started, self.killed_at), 2), o.reason[:80], o.detail[:120])
               for _, o in waits[:3]]
        return (f"[tierserve replica kill: {name}] {len(self.outcomes)} requests: {dict(self.count())}; "
                f"served by {dict(self.providers())}; longest wait past the kill {self.slowest_after_kill():.2f}s "
                f"(top {slow}: {how}, with end-to-end s); route reasons {dict(reasons)}; refusals {dict(refusals)}")


def one(client: httpx.Client, model: str, index: int, streamed: bool) -> Outcome:
    out = Outcome(index, streamed, time.monotonic())
    body = {"model": model, "messages": [{"role": "user", "content": f"request {index}:{PROMPT_END}"}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": streamed}
    try:
        if not streamed:
            r = client.post("/v1/chat/completions", json=body)
            classify(out, r.status_code, r.headers, r.text, None)
        else:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")] \
                    if r.status_code == 200 else None
                classify(out, r.status_code, r.headers, r.read().decode() if events is None else "", events)
    except httpx.HTTPError as exc:
        out.kind, out.detail = "broken", repr(exc)
    out.ended = time.monotonic()
    return out


def classify(out: Outcome, status: int, headers: httpx.Headers, text: str, events: list[str] | None) -> None:
    out.status, out.provider = status, headers.get("x-tierserve-provider", "")
    out.reason, out.retry_after = headers.get("x-tierserve-route-reason", ""), headers.get("retry-after")
    if status == 200 and events is None:
        choice = json.loads(text)["choices"][0]
        out.kind = "complete" if choice.get("finish_reason") else "broken"
        out.detail = "" if out.kind == "complete" else "no finish_reason"
    elif status == 200 and events is not None:
        parsed = [json.loads(e) for e in events if e != "[DONE]"]
        if any("error" in p for p in parsed):
            out.kind, out.detail = "error_event", next(p for p in parsed if "error" in p)["error"]["message"]
        elif events and events[-1] == "[DONE]" and any(c.get("finish_reason") for p in parsed
                                                       for c in p.get("choices", [])):
            out.kind = "complete"
        else:
            out.kind, out.detail = "broken", f"stream ended without [DONE] or an error event: {events[-3:]}"
    elif status in (429, 503) and out.retry_after:
        out.kind, out.detail = "refused", json.loads(text)["error"]["message"][:300]
    elif status >= 500 and isinstance(json.loads(text).get("error", {}).get("code"), str):
        out.kind, out.detail = "error_5xx", json.loads(text)["error"]["message"][:300]
    else:
        out.kind, out.detail = "broken", f"{status}: {text[:300]}"


def run_load(base: str, key: str, model: str, kill: Callable[[], None],
             proxies: dict[str, FaultProxy] | None = None) -> Load:
    wait_recovered(base, key, model)  # a healthy tier to start from, whatever ran before
    load, began = Load(), time.monotonic()
    lock = threading.Lock()
    with httpx.Client(base_url=base, headers=auth(key), timeout=120) as client, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, client, model, i, i % 2 == 1) for i in range(N)]
        time.sleep(KILL_AFTER_S)
        with lock:
            kill()
            load.killed_at = time.monotonic()
        load.outcomes = sorted((f.result() for f in futures), key=lambda o: o.index)
    for proxy in (proxies or {}).values():
        load.handed_over.update(arrivals(proxy, began))
    return load


def arrivals(proxy: FaultProxy, since: float) -> dict[int, float]:
    """Request index -> when the provider behind `proxy` had the whole request, for this load's requests."""
    found = {}
    for seen in proxy.stats.seen:
        if seen.at < since:
            continue
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            text = json.loads(seen.body)["messages"][0]["content"]
            if text.startswith("request ") and text.endswith(PROMPT_END):
                found[int(text.split()[1].rstrip(":"))] = seen.at
    return found


def wait_recovered(base: str, key: str, tier: str) -> float:
    """Until the tier is ready again and back in routing (its ejection ended); seconds it took."""
    start = time.monotonic()
    with httpx.Client(base_url=base, headers=auth(key), timeout=30) as http:
        while time.monotonic() - start < RECOVER_S:
            ready = http.get("/health/ready").json()["tiers"][tier]["state"] == "ready"
            ejection = http.get("/health/providers").json()["tiers"][tier]
            if ready and ejection["state"] == "ok":
                return time.monotonic() - start
            time.sleep(2)
    pytest.fail(f"tier {tier} not back in routing {RECOVER_S} s after the kill")


def ejections(base: str, tier: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'tierserve_tier_ejections_total{{tier="{tier}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_accounted(load: Load, allowed: set[str]) -> None:
    counts = load.count()
    assert len(load.outcomes) == N and sum(counts.values()) == N
    broken = [o for o in load.outcomes if o.kind not in allowed]
    assert not broken, [(o.index, o.kind, o.detail) for o in broken]
    for o in load.outcomes:
        if o.kind == "error_event":  # only a stream that had started on the replica that died
            assert o.streamed and o.started < load.killed_at, (o.index, o.detail)


@pytest.mark.disruptive
def test_a_killed_replica_sends_its_requests_to_the_provider_at_once(app_url: str, api_key: str, proxies) -> None:
    before = ejections(app_url, "coder")
    peer_before = proxies["peer"].stats.requests
    load = run_load(app_url, api_key, "coder", lambda: replica_process("tier-coder").send_signal(signal.SIGKILL),
                    proxies)
    measured(load.summary("coder replica SIGKILL, peer provider"))
    assert sum(1 for o in load.outcomes if o.provider == "local") > 0  # the tier served until the kill
    assert_accounted(load, {"complete", "refused", "error_event"})
    # Nothing served twice: every answer from the peer reached it once, nothing else did (it retries none here:
    # it answered every request it got).
    by_peer = sum(1 for o in load.outcomes if o.provider == "peer" and o.kind == "complete")
    assert proxies["peer"].stats.requests - peer_before == by_peer
    assert by_peer > 0 and load.slowest_after_kill() <= FAILOVER_S, load.summary("coder")
    assert any("tier coder ejected" in o.reason for o in load.outcomes), [o.reason for o in load.outcomes][-8:]
    assert ejections(app_url, "coder") == before + 1
    took = wait_recovered(app_url, api_key, "coder")
    measured(f"[tierserve replica kill] coder back in routing {took:.1f}s after the load")


@pytest.mark.disruptive
def test_a_killed_engine_core_sends_its_requests_to_the_provider(app_url: str, api_key: str, proxies) -> None:
    """Only the engine core dies: the replica lives on, its engine errored, until Ray's health check replaces it."""
    load = run_load(app_url, api_key, "coder", lambda: engine_core_under("tier-coder").send_signal(signal.SIGKILL),
                    proxies)
    measured(load.summary("coder engine core SIGKILL, peer provider"))
    assert_accounted(load, {"complete", "refused", "error_event"})
    assert load.providers()["peer"] > 0 and load.slowest_after_kill() <= FAILOVER_S, load.summary("coder")
    wait_recovered(app_url, api_key, "coder")


@pytest.mark.disruptive
def test_the_embedded_engine_dying_answers_every_request_promptly(app_url: str, api_key: str) -> None:
    """`reasoning` runs in the ingress replica and has no provider: its requests get a prompt 5xx in the error
    envelope (or the SSE error event if started) while its engine is replaced in place."""
    ingress = replica_process("ingress")
    load = run_load(app_url, api_key, "reasoning", lambda: engine_core_under("ingress").send_signal(signal.SIGKILL))
    measured(load.summary("embedded reasoning engine SIGKILL, no provider"))
    assert_accounted(load, {"complete", "refused", "error_event", "error_5xx"})
    assert load.slowest_after_kill() <= FAILOVER_S, load.summary("reasoning")
    assert psutil.pid_exists(ingress.pid) and replica_process("ingress").pid == ingress.pid
    wait_recovered(app_url, api_key, "reasoning")


@pytest.mark.disruptive
def test_a_killed_replica_with_no_provider_left_is_a_prompt_503(app_url: str, api_key: str, proxies) -> None:
    """Last of these: the refusing providers open their breakers."""
    def kill() -> None:
        for name in ("peer", "metered"):
            proxies[name].set("refuse")
        replica_process("tier-coder").send_signal(signal.SIGKILL)

    try:
        load = run_load(app_url, api_key, "coder", kill)
    finally:
        for name in ("peer", "metered"):
            proxies[name].set("pass")
    measured(load.summary("coder replica SIGKILL, every provider refusing"))
    try:
        assert_accounted(load, {"complete", "refused", "error_event"})
        assert load.count()["refused"] > 0 and load.slowest_after_kill() <= FAILOVER_S, load.summary("coder")
    finally:
        wait_recovered(app_url, api_key, "coder")
        time.sleep(9)  # the providers' breakers (cooldown 8 s in the test profile) close before the next tests
