"""Circuit breakers for providers: pure state machines with an injected clock.

closed --N consecutive failures--> open --cooldown--> half-open --probe ok--> closed
                                     ^                    |
                                     +---probe failed-----+

Half-open lets exactly one probe through. Its slot is leased: a probe that never reports (the caller was
cancelled and forgot `release`) frees the slot after `probe_timeout_s`, so a breaker can't stay stuck
(LiteLLM #7779: cooldowns that never ended after stream timeouts).

Callers ask `available()` (no side effect, for routing), then `acquire()` just before contacting the
target (takes the probe slot when half-open), then report exactly one of `success`, `failure`, `release`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int = 3,
        cooldown_s: float = 300.0,
        probe_timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        ewma_alpha: float = 0.2,
        window: int = 256,
    ) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be >= 1 and cooldown_s > 0")
        self.name = name
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        self.wall = wall  # only to show open_until as a timestamp; decisions use `clock`
        self.ewma_alpha = ewma_alpha
        self.successes = 0
        self.errors = 0
        self.consecutive_failures = 0
        self.opened = 0  # times the breaker opened
        self.last_error: str | None = None
        self.latency_ewma_s: float | None = None
        self.latencies: deque[float] = deque(maxlen=window)  # the last `window` samples, for p95
        self._open_until: float | None = None  # clock time; None while closed
        self._probe_until: float | None = None  # the probe slot's lease end while half-open

    # -- state --------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._open_until is None:
            return "closed"
        return "open" if self.clock() < self._open_until else "half_open"

    def available(self) -> bool:
        """Would `acquire` succeed now? No side effect: the router may ask as often as it likes."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        return self._probe_until is None or self.clock() >= self._probe_until

    def retry_in_s(self) -> float:
        """Seconds until the target may be tried again (0 when available)."""
        if self.available():
            return 0.0
        now = self.clock()
        if self._open_until is not None and now < self._open_until:
            return self._open_until - now
        return max(0.0, (self._probe_until or now) - now)  # half-open, probe in flight

    def acquire(self) -> bool:
        """Take permission to send one request; when half-open this is the single probe slot."""
        if not self.available():
            return False
        if self.state == "half_open":
            self._probe_until = self.clock() + self.probe_timeout_s
        return True

    # -- outcomes -----------------------------------------------------------------------------------

    def success(self, latency_s: float | None = None) -> None:
        self.successes += 1
        self._observe(latency_s)
        self.consecutive_failures = 0
        if self.state != "open":  # a late success of a request sent before opening doesn't end the cooldown
            self._open_until = None
            self._probe_until = None

    def failure(self, error: str = "", latency_s: float | None = None) -> None:
        self.errors += 1
        self._observe(latency_s)
        self.consecutive_failures += 1
        self.last_error = error[:300] or None
        state = self.state
        if state == "half_open" or (state == "closed" and self.consecutive_failures >= self.threshold):
            self._open_until = self.clock() + self.cooldown_s
            self._probe_until = None
            self.opened += 1

    def release(self) -> None:
        """The acquired request ended without a verdict (client went away): free the probe slot."""
        self._probe_until = None

    def _observe(self, latency_s: float | None) -> None:
        if latency_s is None:
            return
        self.latencies.append(latency_s)
        prev = self.latency_ewma_s
        self.latency_ewma_s = latency_s if prev is None else prev + self.ewma_alpha * (latency_s - prev)

    # -- reporting ----------------------------------------------------------------------------------

    def p95_s(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        open_until = None
        if self._open_until is not None and state == "open":
            open_until = round(self.wall() + (self._open_until - self.clock()), 3)
        p95 = self.p95_s()
        return {
            "state": state,
            "open_until": open_until,  # unix time, while open
            "retry_in_s": round(self.retry_in_s(), 3),
            "consecutive_failures": self.consecutive_failures,
            "successes": self.successes,
            "errors": self.errors,
            "opened": self.opened,
            "last_error": self.last_error,
            "latency_ewma_s": None if self.latency_ewma_s is None else round(self.latency_ewma_s, 4),
            "latency_p95_s": None if p95 is None else round(p95, 4),
        }


class BreakerRegistry:
    """Breakers by name, created on first use with the same settings and clocks."""

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown_s: float = 300.0,
        probe_timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = {"failures": failures, "cooldown_s": cooldown_s, "probe_timeout_s": probe_timeout_s}
        self.clock = clock
        self.wall = wall
        self.breakers: dict[str, Breaker] = {}

    @classmethod
    def from_config(
        cls, config: Any, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> BreakerRegistry:
        """From a `serving.config.BreakerConfig` (`AppConfig.routing.breaker`)."""
        return cls(
            failures=config.failures,
            cooldown_s=config.cooldown_s,
            probe_timeout_s=config.probe_timeout_s,
            clock=clock,
            wall=wall,
        )

    def get(self, name: str) -> Breaker:
        breaker = self.breakers.get(name)
        if breaker is None:
            s = self.settings
            breaker = Breaker(name, failures=int(s["failures"]), cooldown_s=s["cooldown_s"],
                              probe_timeout_s=s["probe_timeout_s"], clock=self.clock, wall=self.wall)
            self.breakers[name] = breaker
        return breaker

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each breaker's state, by name."""
        return {name: breaker.snapshot() for name, breaker in sorted(self.breakers.items())}
