"""Cost accounting and budgets: prices, period rollover by the injected clock, persistence across restarts."""

from __future__ import annotations

import calendar
import json
from pathlib import Path

import pytest

from serving.config import Provider
from serving.spend.ledger import Budget, period_end
from tests.support.clock import Clock


def provider(**kw: object) -> Provider:
    base = {"name": "openai", "base_url": "https://api.example/v1", "default_model": "m", "paid": True,
            "price_input_per_1m_usd": 2.0, "price_output_per_1m_usd": 8.0}
    return Provider.model_validate({**base, **kw})


def test_cost_from_tokens_and_prices(tmp_path: Path) -> None:
    b = Budget(tmp_path / "s.db", [provider()], clock=Clock())
    assert b.cost("openai", 1_000_000, 500_000) == pytest.approx(6.0)
    assert b.record("provider", "openai", 1000, 2000) == pytest.approx(0.018)
    assert b.record("key", "0123456789ab", 1000, 2000, cost_usd=0.5) == 0.5  # a key's cost is what it was charged
    day = b.totals("provider", "openai", "day")
    assert (day.requests, day.prompt_tokens, day.completion_tokens) == (1, 1000, 2000)
    assert b.totals("key", "0123456789ab", "month").completion_tokens == 2000


def test_daily_budget_trips_and_resets_at_utc_midnight(tmp_path: Path) -> None:
    clock = Clock()
    b = Budget(tmp_path / "s.db", [provider(budget_daily_usd=1.0)], clock=clock, cache_s=0)
    assert b.over_budget("openai") is None and b.reset_in_s("openai") is None
    b.record("provider", "openai", 0, 100_000)  # $0.80
    assert b.over_budget("openai") is None
    b.record("provider", "openai", 0, 25_000)  # $1.00: spent
    reason = b.over_budget("openai")
    assert reason is not None and "daily budget $1.00 spent" in reason and "2025-02-01 00:00 UTC" in reason
    assert b.reset_in_s("openai") == pytest.approx(2 * 3600)
    clock.t += 2 * 3600  # a new day (and a new month)
    assert b.over_budget("openai") is None
    assert b.totals("provider", "openai", "day").cost_usd == 0


def test_monthly_budget_outlives_the_day(tmp_path: Path) -> None:
    clock = Clock(calendar.timegm((2025, 2, 10, 12, 0, 0)))
    b = Budget(tmp_path / "s.db", [provider(budget_monthly_usd=5.0)], clock=clock, cache_s=0)
    b.record("provider", "openai", 0, 700_000)  # $5.60
    clock.t += 86400  # next day, same month: still out
    assert "monthly budget $5.00" in (b.over_budget("openai") or "")
    assert b.reset_in_s("openai") == pytest.approx(period_end(clock.t, "month") - clock.t)
    clock.t = calendar.timegm((2025, 3, 1, 0, 0, 1))
    assert b.over_budget("openai") is None


def test_zero_budget_never_spends(tmp_path: Path) -> None:
    b = Budget(tmp_path / "s.db", [provider(budget_daily_usd=0)], clock=Clock())
    assert b.over_budget("openai") is not None
    assert Budget(tmp_path / "t.db", [provider()], clock=Clock()).over_budget("openai") is None  # no limit set


def test_totals_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spend.db"  # parent created on demand
    first = Budget(path, [provider(budget_daily_usd=0.5)], clock=Clock())
    first.record("provider", "openai", 10_000, 60_000)  # $0.50
    first.record("provider", "openai", 5, 7, estimated=True)  # a stream cut before its usage chunk
    first.close()
    second = Budget(path, [provider(budget_daily_usd=0.5)], clock=Clock())
    day = second.totals("provider", "openai", "day")
    assert (day.requests, day.estimated, day.prompt_tokens, day.completion_tokens) == (2, 1, 10_005, 60_007)
    assert second.over_budget("openai") is not None


def test_shared_file_seen_by_another_instance_after_cache(tmp_path: Path) -> None:
    a = Budget(tmp_path / "s.db", [provider(budget_daily_usd=0.01)], clock=Clock(), cache_s=0)
    b = Budget(tmp_path / "s.db", [provider(budget_daily_usd=0.01)], clock=Clock(), cache_s=0)
    assert b.over_budget("openai") is None
    a.record("provider", "openai", 0, 2000)
    assert b.over_budget("openai") is not None


def test_snapshot_shows_each_providers_totals_and_budget(tmp_path: Path) -> None:
    b = Budget(tmp_path / "s.db", [provider(budget_daily_usd=3)], clock=Clock(calendar.timegm((2025, 1, 31, 0, 0, 0))))
    b.record("provider", "openai", 1000, 2000)
    snap = b.snapshot()
    json.dumps(snap)
    assert snap["openai"]["day"]["completion_tokens"] == 2000 and snap["openai"]["day"]["cost_usd"] == 0.018
    assert snap["openai"]["budget_daily_usd"] == 3 and snap["openai"]["over_budget"] is None
