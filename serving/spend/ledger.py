"""The spend ledger: usage and cost per provider and per API key, daily/monthly USD budgets, in SQLite.

Periods are UTC calendar days and months of an injected wall clock. Every request is recorded once, after
it ends, streamed ones included (their usage arrives with the last chunk; a cut stream records an
estimate, flagged as such), so a budget can't be bypassed by streaming (LiteLLM #37923).

One row per (kind, name, period) with running sums; `over_budget` reads cached totals that are refreshed
from the file at most every `cache_s`, so several ingress processes sharing the file see each other's
spend within that delay. Concurrent requests can overshoot a budget by what is in flight when it trips.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from serving.config import Provider
from serving.spend.pricing import provider_cost
from serving.spend.statedb import open_state_db

Kind = Literal["provider", "key"]  # a provider's spend (its budgets), or an API key's (serving/security/quotas.py)
Period = Literal["day", "month"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    period TEXT NOT NULL,            -- 'day:2025-01-31' or 'month:2025-01' (UTC)
    requests INTEGER NOT NULL DEFAULT 0,
    estimated INTEGER NOT NULL DEFAULT 0,  -- requests whose usage was estimated (stream cut before usage)
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, name, period)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    estimated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "estimated": self.estimated,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
        }


def period_keys(now: float) -> dict[Period, str]:
    t = datetime.fromtimestamp(now, UTC)
    return {"day": f"day:{t:%Y-%m-%d}", "month": f"month:{t:%Y-%m}"}


def period_end(now: float, period: Period) -> float:
    """Unix time at which the UTC day/month containing `now` ends."""
    t = datetime.fromtimestamp(now, UTC)
    day_start = calendar.timegm((t.year, t.month, t.day, 0, 0, 0))
    if period == "day":
        return day_start + 86400.0
    days = calendar.monthrange(t.year, t.month)[1]
    return calendar.timegm((t.year, t.month, 1, 0, 0, 0)) + days * 86400.0


class Budget:
    def __init__(
        self,
        path: str | Path,
        providers: Sequence[Provider] = (),
        *,
        clock: Callable[[], float] = time.time,
        cache_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.providers = {p.name: p for p in providers}
        self.clock = clock  # wall clock (unix seconds): periods are calendar days/months
        self.cache_s = cache_s
        self.db, self.lock = open_state_db(self.path, SCHEMA)
        self._cache: dict[tuple[Kind, str, str], tuple[float, Totals]] = {}

    @classmethod
    def from_config(cls, path: str | Path, config: Any, **kwargs: Any) -> Budget:
        """From an `AppConfig` (its providers)."""
        return cls(path, config.providers, **kwargs)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- accounting ---------------------------------------------------------------------------------

    def cost(self, provider: str, prompt_tokens: int, completion_tokens: int) -> float:
        return provider_cost(self.providers.get(provider), prompt_tokens, completion_tokens)

    def record(
        self,
        kind: Kind,
        name: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        estimated: bool = False,
        cost_usd: float | None = None,
    ) -> float:
        """Account one finished request (streamed or not); returns its cost (a provider's from its prices)."""
        if cost_usd is None:
            cost_usd = self.cost(name, prompt_tokens, completion_tokens) if kind == "provider" else 0.0
        now = self.clock()
        row = (1, int(estimated), max(0, prompt_tokens), max(0, completion_tokens), cost_usd)
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for key in period_keys(now).values():
                    self.db.execute(
                        "INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, name, period) DO UPDATE"
                        " SET requests = requests + excluded.requests, estimated = estimated + excluded.estimated,"
                        " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                        " completion_tokens = completion_tokens + excluded.completion_tokens,"
                        " cost_usd = cost_usd + excluded.cost_usd",
                        (kind, name, key, *row),
                    )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            for key in period_keys(now).values():
                self._cache.pop((kind, name, key), None)
        return cost_usd

    def totals(self, kind: Kind, name: str, period: Period) -> Totals:
        """The running totals of the current day or month."""
        key = period_keys(self.clock())[period]
        cached = self._cache.get((kind, name, key))
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        with self.lock:
            row = self.db.execute(
                "SELECT requests, estimated, prompt_tokens, completion_tokens, cost_usd FROM spend"
                " WHERE kind = ? AND name = ? AND period = ?",
                (kind, name, key),
            ).fetchone()
        totals = Totals(*row) if row else Totals()
        self._cache[(kind, name, key)] = (now, totals)
        return totals

    # -- budgets ------------------------------------------------------------------------------------

    def _limits(self, provider: str) -> list[tuple[Period, float]]:
        p = self.providers.get(provider)
        if p is None:
            return []
        limits: list[tuple[Period, float | None]] = [("day", p.budget_daily_usd), ("month", p.budget_monthly_usd)]
        return [(period, limit) for period, limit in limits if limit is not None]

    def over_budget(self, provider: str) -> str | None:
        """Why the provider is out of rotation (a budget of its current period is spent), or None."""
        for period, limit in self._limits(provider):
            spent = self.totals("provider", provider, period).cost_usd
            if spent >= limit:
                label = "daily" if period == "day" else "monthly"
                until = datetime.fromtimestamp(period_end(self.clock(), period), UTC)
                return (
                    f"provider {provider}: {label} budget ${limit:.2f} spent (${spent:.4f}); "
                    f"back after {until:%Y-%m-%d %H:%M} UTC"
                )
        return None

    def reset_in_s(self, provider: str) -> float | None:
        """Seconds until the provider's spent budget(s) reset (None when it is within budget)."""
        now = self.clock()
        ends = [
            period_end(now, period)
            for period, limit in self._limits(provider)
            if self.totals("provider", provider, period).cost_usd >= limit
        ]
        return max(ends) - now if ends else None

    # -- reporting ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Totals per provider for the current day and month, with budgets and reasons."""
        out: dict[str, Any] = {}
        for name, p in self.providers.items():
            out[name] = {
                "day": self.totals("provider", name, "day").to_dict(),
                "month": self.totals("provider", name, "month").to_dict(),
                "budget_daily_usd": p.budget_daily_usd,
                "budget_monthly_usd": p.budget_monthly_usd,
                "over_budget": self.over_budget(name),
            }
        return out
