"""Circuit breaker state machine with an injected clock."""

from __future__ import annotations

import json

import pytest

from serving.backends.breaker import Breaker, BreakerRegistry
from serving.config import BreakerConfig
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


def make(clock: Clock, **kw: float) -> Breaker:
    return Breaker("provider:x", failures=3, cooldown_s=300, clock=clock, wall=lambda: 1_700_000_000.0, **kw)


def test_opens_after_n_consecutive_failures_only(clock: Clock) -> None:
    b = make(clock)
    b.failure("e1")
    b.failure("e2")
    b.success(0.1)  # resets the streak: non-consecutive failures never open it
    b.failure("e3")
    b.failure("e4")
    assert b.state == "closed" and b.available()
    b.failure("e5")
    assert b.state == "open" and not b.available() and not b.acquire()
    assert b.retry_in_s() == pytest.approx(300)
    assert (b.errors, b.successes, b.consecutive_failures, b.opened, b.last_error) == (5, 1, 3, 1, "e5")


def test_half_open_lets_exactly_one_probe_and_success_closes(clock: Clock) -> None:
    b = make(clock)
    for _ in range(3):
        b.failure()
    clock.t += 299.9
    assert b.state == "open"
    clock.t += 0.2
    assert b.state == "half_open" and b.available()
    assert b.acquire()  # the probe
    assert not b.available() and not b.acquire()  # a second caller is held back
    b.success(0.2)
    assert b.state == "closed" and b.acquire() and b.acquire()
    assert b.consecutive_failures == 0


def test_failed_probe_reopens_for_a_fresh_cooldown(clock: Clock) -> None:
    b = make(clock)
    for _ in range(3):
        b.failure()
    clock.t += 300
    assert b.acquire()
    b.failure("still down")
    assert b.state == "open" and b.retry_in_s() == pytest.approx(300) and b.opened == 2
    clock.t += 300
    assert b.state == "half_open"


def test_probe_slot_is_released_or_expires(clock: Clock) -> None:
    b = make(clock, probe_timeout_s=60)
    for _ in range(3):
        b.failure()
    clock.t += 300
    assert b.acquire()
    b.release()  # the client went away: no verdict, next caller may probe
    assert b.acquire()
    assert not b.available()
    clock.t += 60  # the probe never reported: its lease ends, the breaker can't stay stuck
    assert b.available() and b.acquire()


def test_late_success_does_not_end_cooldown(clock: Clock) -> None:
    b = make(clock)
    for _ in range(3):
        b.failure()
    b.success(0.1)  # a request sent before the breaker opened
    assert b.state == "open"


def test_latency_ewma_and_p95_bounded(clock: Clock) -> None:
    b = make(clock, window=100)
    for i in range(1000):
        b.success(float(i % 100))
    assert len(b.latencies) == 100
    assert b.p95_s() == 95.0
    assert b.latency_ewma_s is not None and 0 < b.latency_ewma_s < 100
    b2 = make(clock, ewma_alpha=0.5)
    b2.success(1.0)
    b2.success(3.0)
    assert b2.latency_ewma_s == 2.0


def test_registry_snapshot_is_json(clock: Clock) -> None:
    reg = BreakerRegistry.from_config(BreakerConfig(failures=2, cooldown_s=10), clock=clock, wall=lambda: 5000.0)
    assert reg.get("openai") is reg.get("openai")
    reg.get("openai").failure("boom")
    reg.get("openai").failure("boom", 0.5)
    reg.get("peer").success(0.05)
    snap = reg.snapshot()
    json.dumps(snap)
    openai = snap["openai"]
    assert openai["state"] == "open" and openai["open_until"] == 5010.0 and openai["retry_in_s"] == 10
    assert openai["consecutive_failures"] == 2 and openai["errors"] == 2 and openai["last_error"] == "boom"
    assert snap["peer"] == {
        "state": "closed", "open_until": None, "retry_in_s": 0.0, "consecutive_failures": 0, "successes": 1,
        "errors": 0, "opened": 0, "last_error": None, "latency_ewma_s": 0.05, "latency_p95_s": 0.05,
    }


def test_bad_settings_rejected() -> None:
    with pytest.raises(ValueError):
        Breaker("x", failures=0)
