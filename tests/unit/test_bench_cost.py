"""The benchmark's cost arithmetic (benchmarks/cost.py): price per 1M output tokens, break-even, report blocks."""

from __future__ import annotations

import pytest

from benchmarks import cost
from serving.config import Provider, Tier

MIX = cost.Mix(prompt_tokens=128, output_tokens=64)  # 2 input tokens per output token


def _tier(**fields: object) -> Tier:
    return Tier.model_validate({"served_name": "m", "model": {"repo": "org/m"}, **fields})


def _level(tok_per_s: float | None) -> dict:
    return {"output_tok_per_s": tok_per_s}


def test_tier_price_prefers_the_tiers_hourly_price_then_its_gpu_share() -> None:
    assert cost.tier_price(_tier(cost_per_hour_usd=0.5, cost_per_gpu_hour_usd=2.0, resources={"gpus": 0.5}))[0] == 0.5
    hourly, source = cost.tier_price(_tier(cost_per_gpu_hour_usd=1.79, resources={"gpus": 0.22}))
    assert hourly == pytest.approx(0.3938)
    assert "1.79" in source and "0.22" in source
    hourly, source = cost.tier_price(_tier())
    assert hourly is None and "--gpu-hourly-usd" in source


def test_the_flag_prices_a_whole_gpu_and_a_cpu_tier_pays_the_whole_machine() -> None:
    gpu = _tier(cost_per_hour_usd=9.0, resources={"gpus": 0.25})
    assert cost.tier_price(gpu, gpu_hourly_usd=2.0)[0] == 0.5
    assert cost.tier_price(_tier(resources={"gpus": 0}), gpu_hourly_usd=2.0)[0] == 2.0


def test_usd_per_1m_output_tokens_from_throughput() -> None:
    # $3.60/h at 1000 tok/s: 3.6M tokens an hour, $1 per 1M
    assert cost.usd_per_1m_output(1000, 3.6) == pytest.approx(1.0)
    assert cost.usd_per_1m_output(None, 3.6) is None
    assert cost.usd_per_1m_output(0, 3.6) is None


def test_provider_price_per_output_token_includes_the_prompts_of_the_mix() -> None:
    openai = cost.ProviderPrice("openai", input_per_1m_usd=2.0, output_per_1m_usd=8.0)
    assert MIX.input_per_output == 2.0
    assert openai.per_1m_output(MIX) == pytest.approx(8.0 + 2 * 2.0)
    assert openai.per_1m_output(cost.Mix(0, 64)) == 8.0


def test_break_even_and_busy_share() -> None:
    monthly = 1.0 * cost.HOURS_PER_MONTH  # $730 a month
    even = cost.break_even_output_tokens(monthly, 12.0)
    assert even == pytest.approx(730 / 12 * 1e6)
    capacity = cost.monthly_output_capacity(1000)
    assert capacity == pytest.approx(1000 * 3600 * 730)
    assert cost.busy_share(even, capacity) == pytest.approx(even / capacity)
    assert cost.break_even_output_tokens(monthly, 0.0) is None  # a free provider: never
    assert cost.busy_share(None, capacity) is None and cost.busy_share(even, None) is None


@pytest.mark.parametrize(("hourly", "tok_per_s", "provider_per_1m"), [(0.39, 800, 12.0), (1.79, 50, 3.0), (2, 111, 5)])
def test_busy_at_most_one_exactly_when_the_tier_is_cheaper_per_token_at_full_use(
    hourly: float, tok_per_s: float, provider_per_1m: float
) -> None:
    even = cost.break_even_output_tokens(hourly * cost.HOURS_PER_MONTH, provider_per_1m)
    busy = cost.busy_share(even, cost.monthly_output_capacity(tok_per_s))
    local = cost.usd_per_1m_output(tok_per_s, hourly)
    assert busy is not None and local is not None
    assert busy == pytest.approx(local / provider_per_1m)
    assert (busy <= 1) == (local <= provider_per_1m)


def test_paid_providers_are_those_marked_paid_or_priced() -> None:
    providers = [
        Provider.model_validate({"name": "peer", "base_url": "http://10.0.0.2/v1", "default_model": "m"}),
        Provider.model_validate({"name": "openai", "base_url": "https://api.openai.com/v1", "default_model": "m",
                                 "paid": True, "price_input_per_1m_usd": 2.0, "price_output_per_1m_usd": 8.0}),
        Provider.model_validate({"name": "cheap", "base_url": "https://x/v1", "default_model": "m",
                                 "price_output_per_1m_usd": 0.5}),
    ]
    got = cost.paid_providers(providers)
    assert [(p.name, p.input_per_1m_usd, p.output_per_1m_usd) for p in got] == [("openai", 2.0, 8.0),
                                                                                ("cheap", 0.0, 0.5)]


def test_parse_price_flag() -> None:
    p = cost.parse_price("openai=2/8")
    assert (p.name, p.input_per_1m_usd, p.output_per_1m_usd, p.source) == ("openai", 2.0, 8.0, "--provider-price")
    for bad in ("openai", "openai=2", "=2/8", "x=a/b"):
        with pytest.raises(ValueError, match="NAME=INPUT/OUTPUT"):
            cost.parse_price(bad)


RESULTS = {
    "stream": {
        "bare": {1: _level(100.0), 8: _level(800.0)},
        "tierserve": {1: _level(95.0), 8: _level(760.0)},
    },
    "nonstream": {"tierserve": {1: _level(None)}},
}


def test_tier_report_per_level_and_break_even() -> None:
    openai = cost.ProviderPrice("openai", 2.0, 8.0)
    rep = cost.tier_report("fast", 3.6, "test price", RESULTS, [openai], MIX)
    assert rep["monthly_usd"] == pytest.approx(3.6 * 730)
    assert rep["mix"] == {"prompt_tokens": 128, "output_tokens": 64, "input_per_output": 2.0}
    row = rep["per_mode"]["stream"]["bare"][8]
    assert row["usd_per_1m_output_tokens"] == pytest.approx(1.25)  # $1/1M at 1000 tok/s
    assert row["monthly_output_capacity"] == 800 * 3600 * 730
    assert rep["per_mode"]["nonstream"]["tierserve"][1]["usd_per_1m_output_tokens"] is None
    (b,) = rep["break_even"]
    assert b["usd_per_1m_output_tokens_with_mix"] == 12.0
    assert b["output_tokens_per_month"] == round(3.6 * 730 / 12 * 1e6)
    assert b["all_tokens_per_month"] == round(3.6 * 730 / 12 * 1e6 * 3)
    assert b["busy_share"]["stream"]["tierserve"][8] == pytest.approx(b["output_tokens_per_month"] / (760 * 3600 * 730),
                                                                      abs=1e-4)
    assert b["busy_share"]["nonstream"]["tierserve"][1] is None


def test_markdown_shows_levels_break_even_and_the_mix() -> None:
    rep = cost.tier_report("fast", 3.6, "test price", RESULTS, [cost.ProviderPrice("openai", 2.0, 8.0)], MIX)
    md = "\n".join(cost.markdown(rep, "a caveat"))
    assert "## Cost per 1M output tokens, and break-even (tier `fast`)" in md
    assert "$3.6000/hour" in md and "a caveat" in md
    assert "| conc | bare | tierserve |" in md
    assert "| 8 | 1.2500 (800.0) | 1.3158 (760.0) |" in md
    assert "128 prompt tokens per 64 output tokens" in md
    assert "busy c=1 | busy c=8 |" in md  # tierserve's streaming levels
    assert "| openai | 2.00 | 8.00 | 12.000 | 219M | 657M |" in md
    lines = cost.summary_lines(rep)
    assert lines[0].startswith("cost: tier fast at $3.6000/h")
    assert any("vs openai: cheaper above 219M output tokens/month" in line for line in lines)


def test_markdown_without_providers_or_price() -> None:
    rep = cost.tier_report("fast", 1.0, "p", RESULTS, [], MIX)
    assert "no break-even rows" in "\n".join(cost.markdown(rep))
    unpriced = cost.tier_report("fast", None, "no price: set one", RESULTS, [cost.ProviderPrice("o", 1, 1)], MIX)
    assert unpriced["per_mode"] == {} and unpriced["break_even"] == []
    assert "Not computed: no price: set one." in "\n".join(cost.markdown(unpriced))
