"""Per-key quotas: sliding 60 s windows (requests and tokens per minute), USD budgets, usage reports."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from serving.security.keys import KeyRecord, LimitError
from serving.spend.ledger import Budget, Kind, period_end

WINDOW_S = 60.0
LEDGER_KIND: Final[Kind] = "key"  # ledger rows of a key: name = key id

# -- rate limits, budgets, usage -------------------------------------------------------------------------------


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) of finished requests
    token_sum: int = 0


class Limiter:
    """Per-key sliding 60 s windows (requests and tokens per minute) and USD budgets, in this process.

    `check` before a request admits and counts it, or raises LimitError (429 + retry-after); `record` after it
    adds its tokens to the window and its usage/cost to the persisted ledger. Tokens are known only once a
    request ends, so a key is admitted while its last minute's tokens are under `tpm`: concurrent requests
    can overshoot the limit by what they are generating. Windows are per ingress process (one by default);
    spend is shared through the ledger's SQLite file.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        ledger: Budget | None = None,
        window_s: float = WINDOW_S,
    ) -> None:
        self.clock = clock
        self.ledger = ledger  # None: no budgets and no persisted usage (window counts only)
        self.window_s = window_s
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def _prune(self, w: _Window, now: float) -> None:
        start = now - self.window_s
        while w.requests and w.requests[0] <= start:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= start:
            w.token_sum -= w.tokens.popleft()[1]

    def check(self, key: KeyRecord) -> None:
        """Admit one request of `key` (and count it), or raise LimitError: budget, rpm, then tpm."""
        self.check_budget(key)
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key.id, _Window())
            self._prune(w, now)
            if key.rpm is not None and len(w.requests) >= key.rpm:
                # Free again when the oldest request that keeps us at the limit leaves the window.
                retry = w.requests[len(w.requests) - key.rpm] + self.window_s - now
                raise LimitError(
                    f"agent {key.agent}: rate limit of {key.rpm} requests per minute reached; retry in {retry:.0f}s",
                    "rate_limit_exceeded", retry,
                )
            if key.tpm is not None and w.token_sum >= key.tpm:
                remaining, retry = w.token_sum, self.window_s
                for t, n in w.tokens:
                    remaining -= n
                    if remaining < key.tpm:
                        retry = t + self.window_s - now
                        break
                raise LimitError(
                    f"agent {key.agent}: {w.token_sum} tokens in the last minute, limit {key.tpm} tokens per "
                    f"minute; retry in {retry:.0f}s", "tokens_per_minute_exceeded", retry,
                )
            w.requests.append(now)

    def check_budget(self, key: KeyRecord) -> None:
        if key.budget_usd is None or self.ledger is None:
            return
        spent = self.ledger.totals(LEDGER_KIND, key.id, key.budget_period).cost_usd
        if spent >= key.budget_usd:
            wall = self.ledger.clock()
            end = period_end(wall, key.budget_period)
            label = "daily" if key.budget_period == "day" else "monthly"
            raise LimitError(
                f"agent {key.agent}: {label} budget of ${key.budget_usd:.2f} spent (${spent:.4f}); it resets "
                f"{datetime.fromtimestamp(end, UTC):%Y-%m-%d %H:%M} UTC", "budget_exceeded", end - wall,
            )

    def record_tokens(self, key: KeyRecord, n: int) -> None:
        """Add `n` tokens (prompt + completion) to the key's per-minute window."""
        if n <= 0:
            return
        now = self.clock()
        with self._lock:
            w = self._windows.setdefault(key.id, _Window())
            w.tokens.append((now, n))
            w.token_sum += n
            self._prune(w, now)

    def record(
        self, key: KeyRecord, prompt_tokens: int, completion_tokens: int, cost_usd: float = 0.0, *,
        estimated: bool = False,
    ) -> None:
        """One finished request (streamed or not, failed ones with what they used): window + ledger."""
        self.record_tokens(key, max(0, prompt_tokens) + max(0, completion_tokens))
        if self.ledger is not None:
            self.ledger.record(LEDGER_KIND, key.id, prompt_tokens, completion_tokens, estimated=estimated,
                               cost_usd=cost_usd)

    def window(self, key: KeyRecord) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            w = self._windows.get(key.id)
            if w is None:
                return {"seconds": self.window_s, "requests": 0, "tokens": 0}
            self._prune(w, now)
            return {"seconds": self.window_s, "requests": len(w.requests), "tokens": w.token_sum}

    def usage(self, key: KeyRecord) -> dict[str, Any]:
        """`GET /v1/usage` for this key: limits, the current minute, day and month totals, budget left."""
        out: dict[str, Any] = {"object": "usage", "key": key.public(), "window": self.window(key)}
        if self.ledger is None:
            return out
        day = self.ledger.totals(LEDGER_KIND, key.id, "day")
        month = self.ledger.totals(LEDGER_KIND, key.id, "month")
        out.update(day=day.to_dict(), month=month.to_dict(), budget=None)
        if key.budget_usd is not None:
            spent = (day if key.budget_period == "day" else month).cost_usd
            end = period_end(self.ledger.clock(), key.budget_period)
            out["budget"] = {
                "limit_usd": key.budget_usd,
                "period": key.budget_period,
                "spent_usd": round(spent, 6),
                "remaining_usd": round(max(0.0, key.budget_usd - spent), 6),
                "resets_at": datetime.fromtimestamp(end, UTC).isoformat(),
            }
        return out

    def usage_all(self, keys: Sequence[KeyRecord]) -> dict[str, Any]:
        """The admin view: every key's usage, keyed by id, plus per-agent sums of the month."""
        per_key = {k.id: self.usage(k) for k in keys}
        agents: dict[str, dict[str, float]] = {}
        for k in keys:
            month = per_key[k.id].get("month") or {}
            a = agents.setdefault(k.agent, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0})
            for field_name in a:
                a[field_name] += month.get(field_name, 0)
        return {"object": "usage.list", "keys": per_key, "agents": agents}


