"""The routing decision: pure function of request facts, tier/provider states and config."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from serving.config import AppConfig, ConfigError, build_config
from serving.gateway.router import Decision, RequestFacts, Router, TierState, facts_from_body, looks_like_code
from serving.wire.items import ProviderState

TINY = {"tiny_seed": 1}


def config(**over: Any) -> AppConfig:
    data: dict[str, Any] = {
        "tiers": {
            "coder": {"served_name": "tiny-coder", "aliases": ["code"], "model": TINY,
                      "engine": {"max_model_len": 512}, "overflow": {"max_queue_per_replica": 4}},
            "reasoning": {"served_name": "tiny-reasoning", "model": TINY, "engine": {"max_model_len": 2048}},
            "fast": {"served_name": "tiny-fast", "model": TINY, "engine": {"max_model_len": 512}},
        },
        "providers": [
            {"name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1",
             "api_key_env": "OPENAI_API_KEY", "default_model": "gpt-4o-mini", "max_context": 128000, "paid": True,
             "priority": 20},
            {"name": "peer", "kind": "tierserve", "base_url": "http://10.0.0.2:8000/v1",
             "models": {"coder": "coder", "fast": "fast"}, "max_context": 512, "priority": 10},
        ],
        "routing": {"rules": [
            {"tier": "coder", "name": "code", "code": True, "keywords": ["refactor", "stack trace"]},
            {"tier": "reasoning", "name": "plan", "regex": r"\b(plan|analy[sz]e)\b"},
            {"tier": "reasoning", "name": "big", "min_prompt_tokens": 300},
        ]},
    }
    for key, value in over.items():
        data[key] = value
    return build_config(data, None)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(config())


def chat(text: str, model: str = "auto", **kw: Any) -> RequestFacts:
    return facts_from_body("chat", {"model": model, "messages": [{"role": "user", "content": text}], **kw}, {},
                           config().routing)


def names(decision: Any) -> list[str]:
    return [f"{c.kind}:{c.name}" for c in decision.candidates]


def first(decision: Decision) -> str | None:
    """The candidate tried first (None on a reject)."""
    return decision.candidates[0].name if decision.candidates else None


# -- which tier ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tier", "why"),
    [
        ("```python\nprint(1)\n```", "coder", "code(code)"),
        ("def f(x):\n    return x\n", "coder", "code(code)"),
        ("please REFACTOR this", "coder", "code(keyword)"),
        ("here is the stack trace", "coder", "code(keyword)"),
        ("Make a plan for the migration", "reasoning", "plan(regex)"),
        ("what is the capital of France?", "fast", "default"),
        ("refactoring is a word, not the keyword", "fast", "default"),
    ],
)
def test_auto_rules_in_order(router: Router, text: str, tier: str, why: str) -> None:
    d = router.route(chat(text))
    assert (d.kind, first(d), d.tier) == ("tier", tier, tier)
    assert why in d.reason and d.reason.startswith("auto:")


def test_size_rule_and_names(router: Router) -> None:
    assert first(router.route(chat("word " * 300))) == "reasoning"  # ~375 tokens >= 300
    assert first(router.route(chat("hi", model="code"))) == "coder"  # alias
    assert first(router.route(chat("hi", model="tiny-fast"))) == "fast"  # served name
    d = router.route(chat("```code```", model="fast"))  # explicit model: rules don't apply
    assert first(d) == "fast" and d.reason == "model:fast"


def test_pin_header_wins_and_unknown_pin_is_400(router: Router) -> None:
    routing = config().routing
    body = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}
    d = router.route(facts_from_body("chat", body, {"x-tierserve-tier": "reasoning"}, routing))
    assert first(d) == "reasoning" and d.reason == "pinned:reasoning"
    bad = router.route(facts_from_body("chat", body, {"x-tierserve-tier": "nope"}, routing))
    assert bad.kind == "reject" and bad.status == 400 and bad.param == "x-tierserve-tier"


def test_unknown_model_is_404(router: Router) -> None:
    d = router.route(chat("x", model="gpt-5"))
    err = d.error()
    assert (d.kind, err.status, err.code, err.param) == ("reject", 404, "model_not_found", "model")


def test_default_tier_when_fast_absent() -> None:
    data = {"tiers": {"solo": {"served_name": "s", "model": TINY}}}
    assert first(Router(build_config(data, None)).route(RequestFacts(model="auto"))) == "solo"


# -- candidates: local first, then providers ----------------------------------------------------------


def test_healthy_tier_first_then_free_providers_paid_skipped(router: Router) -> None:
    d = router.route(chat("```x```", model="coder"))
    assert names(d) == ["tier:coder", "provider:peer"]  # priority order; paid openai never listed
    assert ("provider:openai", "paid use disabled (routing.allow_paid: false)") in d.skipped


def test_allow_paid_lists_paid_by_priority() -> None:
    cfg = config(routing={"allow_paid": True})
    d = Router(cfg).route(RequestFacts(model="coder"))
    assert names(d) == ["tier:coder", "provider:peer", "provider:openai"]
    d = Router(cfg).route(RequestFacts(model="reasoning"))
    assert names(d) == ["tier:reasoning", "provider:openai"]  # peer has no model for reasoning: silent


def test_queue_full_overflows_to_provider_or_429(router: Router) -> None:
    full = {"coder": TierState(healthy_replicas=1, ongoing=4)}
    d = router.route(RequestFacts(model="coder"), full)
    assert names(d) == ["provider:peer"] and d.kind == "provider" and "saturated" in d.reason
    assert router.route(RequestFacts(model="coder"), {"coder": TierState(healthy_replicas=2, ongoing=7)}).kind == "tier"
    down = {"peer": ProviderState(available=False, retry_in_s=42.3)}
    d = router.route(RequestFacts(model="coder"), full, down)
    err = d.error()
    assert d.kind == "reject" and err.status == 429 and err.headers["retry-after"] == "2"
    assert "queue full (4 ongoing >= 4)" in err.message and "breaker open" in err.message


def test_no_healthy_replica_is_503_with_breaker_retry_after(router: Router) -> None:
    dead = {"fast": TierState(healthy_replicas=0)}
    assert names(router.route(RequestFacts(model="fast"), dead)) == ["provider:peer"]
    d = router.route(RequestFacts(model="fast"), dead, {"peer": ProviderState(available=False, retry_in_s=3.2)})
    assert (d.status, d.retry_after_s) == (503, 4)  # the soonest obstacle to clear: the peer's breaker


def test_on_unavailable_reject_never_falls_back() -> None:
    tiers = config().model_dump()["tiers"]
    tiers["fast"]["overflow"] = {"on_unavailable": "reject"}
    r = Router(config(tiers=tiers))
    d = r.route(RequestFacts(model="fast"), {"fast": TierState(healthy_replicas=0)})
    assert d.kind == "reject" and d.status == 503 and d.retry_after_s == 10 and d.candidates == ()


def test_cold_tier_wait_or_fallback() -> None:
    cold = {"fast": TierState(healthy_replicas=0, cold=True)}
    d = Router(config()).route(RequestFacts(model="fast"), cold)
    assert names(d) == ["tier:fast", "provider:peer"] and d.candidates[0].max_wait_s == 120
    tiers = config().model_dump()["tiers"]
    tiers["fast"]["overflow"] = {"cold_start": "fallback", "max_cold_wait_s": 30}
    d = Router(config(tiers=tiers)).route(RequestFacts(model="fast"), cold)
    assert names(d) == ["provider:peer", "tier:fast"] and d.candidates[1].max_wait_s == 30


def test_engine_waiting_and_wait_estimate_limits() -> None:
    tiers = config().model_dump()["tiers"]
    tiers["fast"]["overflow"] = {"max_engine_waiting": 0, "max_wait_s": 5}
    r = Router(config(tiers=tiers))
    assert r.route(RequestFacts(model="fast"), {"fast": TierState(engine_waiting=0)}).kind == "tier"
    assert r.route(RequestFacts(model="fast"), {"fast": TierState(engine_waiting=1)}).kind == "provider"
    assert r.route(RequestFacts(model="fast"), {"fast": TierState(est_wait_s=6)}).kind == "provider"


def test_over_budget_provider_skipped_with_reason() -> None:
    r = Router(config(routing={"allow_paid": True}))
    why = "provider openai: daily budget $1.00 spent ($1.0100); back after 2025-02-01 00:00 UTC"
    state = {"openai": ProviderState(over_budget=why, budget_reset_in_s=7200.0)}
    d = r.route(RequestFacts(model="reasoning"), {"reasoning": TierState(healthy_replicas=0)}, state)
    err = d.error()
    assert d.kind == "reject" and err.status == 503 and why in err.message


# -- prompt size -------------------------------------------------------------------------------------


def test_too_long_auto_goes_to_a_tier_that_fits(router: Router) -> None:
    facts = chat("def f():\n    pass\n" + "x" * 3000)  # code -> coder (512) but ~760 tokens
    d = router.route(facts)
    assert first(d) == "reasoning" and "too-long->reasoning" in d.reason
    assert any(who == "tier:coder" and "max_model_len 512" in why for who, why in d.skipped)


def test_too_long_explicit_goes_to_larger_provider_or_to_the_engine() -> None:
    facts = RequestFacts(model="fast", prompt_tokens=1000)
    d = Router(config(routing={"allow_paid": True})).route(facts)
    assert names(d) == ["provider:openai"] and d.tier == "fast"  # peer's 512 window is too small too
    # No provider fits: the estimate alone never rejects; the tier's engine counts exactly and answers 400.
    d = Router(config()).route(facts)
    assert names(d) == ["tier:fast"] and d.reason.endswith("engine-checks-length")
    facts = RequestFacts(model="fast", prompt_tokens=100, max_tokens=500)  # output counts as well
    assert Router(config()).route(facts).reason.endswith("engine-checks-length")


def test_completion_endpoint_and_provider_endpoints() -> None:
    providers = config().model_dump()["providers"]
    providers[1]["endpoints"] = ["chat"]
    r = Router(config(providers=providers))
    facts = facts_from_body("completion", {"model": "fast", "prompt": "hello"}, {}, config().routing)
    assert names(r.route(facts)) == ["tier:fast"]
    assert facts.text == "hello" and facts.prompt_tokens == 2
    ids = facts_from_body("completion", {"model": "fast", "prompt": [1, 2, 3]}, {}, config().routing)
    assert ids.prompt_tokens == 3


# -- facts and cost ----------------------------------------------------------------------------------


def test_facts_from_messy_bodies() -> None:
    routing = config().routing
    body = {"model": "auto", "max_tokens": 16, "messages": [
        {"role": "system", "content": "s" * 40},
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "last ```"}]},
        "garbage",
    ]}
    f = facts_from_body("chat", body, {}, routing)
    assert f.text == "last ```" and f.max_tokens == 16 and f.prompt_tokens == 14 + 4 * 4
    assert facts_from_body("chat", {"model": 3, "messages": "x"}, {}, routing).model == ""
    assert facts_from_body("chat", body, {}, routing, prompt_tokens=99).prompt_tokens == 99
    long = facts_from_body("chat", {"messages": [{"role": "user", "content": "a" * 10 + "b" * 40000}]}, {}, routing)
    assert len(long.text) <= routing.scan_chars + 1 and long.text.startswith("a") and long.text.endswith("b")


def test_facts_from_a_responses_body() -> None:
    routing = config().routing  # 4 characters a token, 4 tokens a message
    body = {"model": "auto", "max_output_tokens": 32, "instructions": "i" * 8, "input": [
        {"role": "user", "content": "older"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "plan ```"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "o" * 6},
        7,
    ]}
    f = facts_from_body("responses", body, {}, routing)
    assert (f.endpoint, f.text, f.max_tokens) == ("responses", "plan ```", 32)
    assert f.prompt_tokens == 8 + 4 * 5  # (8 + 5 + 8 + 2 + 6) / 4 characters, rounded up; instructions, 4 items
    text = facts_from_body("responses", {"model": "fast", "input": "a" * 8, "max_tokens": 5}, {}, routing)
    assert (text.text, text.prompt_tokens, text.max_tokens) == ("a" * 8, 2 + 4, None)  # max_tokens isn't its field


def test_facts_from_an_anthropic_body() -> None:
    routing = config().routing
    body = {"model": "auto", "max_tokens": 64, "system": [{"type": "text", "text": "s" * 12}], "messages": [
        {"role": "user", "content": "refactor this"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                          {"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x" * 20}]},
        {"role": "user", "content": None},
        "junk",
    ]}
    f = facts_from_body("messages", body, {}, routing)
    # The last user words: a turn of tool results only is the counterpart of chat's role "tool".
    assert (f.endpoint, f.text, f.max_tokens) == ("messages", "refactor this", 64)
    assert f.prompt_tokens == 12 + 4 * 5  # (12 + 13 + 2 + 20) / 4 characters, rounded up; system, 4 turns
    counted = facts_from_body("count_tokens", {**body, "max_tokens": None}, {}, routing)
    assert (counted.text, counted.prompt_tokens, counted.max_tokens) == ("refactor this", f.prompt_tokens, None)
    blocks = [{"type": "text", "text": "a"}, {"type": "image", "source": {}}, {"type": "text", "text": "b"}]
    assert facts_from_body("messages", {"messages": [{"role": "user", "content": blocks}]}, {}, routing).text == "a\nb"


def test_facts_from_embeddings_bodies() -> None:
    routing = config().routing
    f = facts_from_body("embeddings", {"model": "embed", "input": ["first", "second text"]}, {}, routing)
    assert (f.endpoint, f.text, f.prompt_tokens, f.max_tokens) == ("embeddings", "second text", 4, None)
    assert facts_from_body("embeddings", {"input": "abcdefgh"}, {}, routing).prompt_tokens == 2
    assert facts_from_body("embeddings", {"input": [5, 6, 7]}, {}, routing).prompt_tokens == 3  # token ids: exact
    assert facts_from_body("embeddings", {"input": [[1, 2], [3]]}, {}, routing).prompt_tokens == 3
    assert facts_from_body("completion", {"prompt": [[1, 2], [3], "abcd"]}, {}, routing).prompt_tokens == 4


@pytest.mark.parametrize("endpoint", ["chat", "completion", "responses", "messages", "count_tokens", "embeddings"])
def test_facts_never_raise_on_malformed_fields(endpoint: str) -> None:
    routing = config().routing
    junk: list[Any] = [None, True, 3, -1.5, "s", [], {}, [None, 1, "x", [True]], {"type": "text", "text": 5},
                       [{"role": "user", "content": [{"type": "text", "text": None}, {"type": "tool_result",
                                                                                      "content": 7}, 9]}]]
    for value in junk:
        body = {name: value for name in ("model", "messages", "prompt", "input", "instructions", "system",
                                         "max_tokens", "max_output_tokens", "max_completion_tokens")}
        f = facts_from_body(endpoint, body, {}, routing)
        assert f.prompt_tokens >= 0 and isinstance(f.text, str) and f.max_tokens in (None, 3)


def test_looks_like_code() -> None:
    assert looks_like_code("import os\nprint(os.getcwd())\nx = {\n}")
    assert not looks_like_code("The meeting is at 3pm; bring notes. What does return mean here?")


def test_route_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keyword and code matchers are substring searches; a `regex` rule costs what Python's re costs
    # (~50-100 ns per scanned character here), bounded by routing.scan_chars.
    rules = [{"tier": "coder", "code": True, "keywords": ["refactor", "stack trace", "unit test"]},
             {"tier": "reasoning", "keywords": ["plan", "analyze", "design"], "regex": "^plan:"}]
    router = Router(config(routing={"rules": rules}))
    facts = chat("what is the capital of France? " * 60)  # 1,860 chars, no rule matches: every matcher runs
    states = {"fast": TierState(healthy_replicas=1, ongoing=1)}

    def no_compile(*_: object, **__: object) -> None:
        raise AssertionError("route() compiled a regex")

    monkeypatch.setattr("serving.gateway.router.re.compile", no_compile)
    assert first(router.route(facts, states)) == "fast"
    best = float("inf")
    for _ in range(5):  # the best of 5 batches: the machine is shared, contention only adds
        start = time.perf_counter()
        for _ in range(200):
            router.route(facts, states)
        best = min(best, (time.perf_counter() - start) / 200)
    assert best < 1e-3, best  # ~50 us measured here on 2 busy cores


def test_config_rejects_bad_routing_refs() -> None:
    with pytest.raises(ConfigError, match="unknown tier 'nope'"):
        config(routing={"rules": [{"tier": "nope", "keywords": ["x"]}]})
    with pytest.raises(ConfigError, match="unknown tier"):
        config(routing={"default_tier": "nope"})
    with pytest.raises(ConfigError, match="api_key_env"):
        config(providers=[{"name": "p", "base_url": "http://x/v1", "default_model": "m", "api_key_env": "sk-abc123"}])
    with pytest.raises(ConfigError, match=r"models.*unknown tier\(s\) ghost"):
        config(providers=[{"name": "p", "base_url": "http://x/v1", "models": {"ghost": "m"}}])
    with pytest.raises(ConfigError, match="set `models`"):
        config(providers=[{"name": "p", "base_url": "http://x/v1"}])
    with pytest.raises(ConfigError, match="used twice"):
        p = {"name": "p", "base_url": "http://x/v1", "default_model": "m"}
        config(providers=[p, p])
    with pytest.raises(ConfigError, match="regex"):
        config(routing={"rules": [{"tier": "fast", "regex": "("}]})


def keyed(text: str, default_tier: str | None, allowed: list[str] | None) -> RequestFacts:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    return facts_from_body("chat", body, {}, config().routing, default_tier=default_tier, allowed=allowed)


@pytest.mark.parametrize(("text", "default_tier", "allowed", "tier"), [
    ("hello there", "reasoning", None, "reasoning"),  # the key's default replaces the catalog's (fast)
    ("hello there", None, None, "fast"),
    ("please refactor this", "fast", None, "coder"),  # a matching rule still wins over the key's default
    ("please refactor this", "fast", ["fast", "reasoning"], "fast"),  # ...unless the key may not use its tier
    ("please refactor this and plan it", None, ["fast", "reasoning"], "reasoning"),  # the next rule that may
    ("hello there", None, ["coder"], "coder"),  # catalog default not allowed: the key's first allowed tier
    ("hello there", "gone", None, "fast"),  # a default tier no longer in the catalog is ignored
])
def test_auto_respects_the_callers_key(router: Router, text: str, default_tier: str | None,
                                       allowed: list[str] | None, tier: str) -> None:
    decision = router.route(keyed(text, default_tier, allowed))
    assert decision.tier == tier, decision.reason


def test_auto_keeps_a_session_on_its_tier_until_the_prompt_outgrows_it(router: Router) -> None:
    kept = replace(chat("what is the capital of France?"), session_tier="coder")  # no rule would pick coder
    d = router.route(kept)
    assert first(d) == "coder" and d.reason.startswith("auto:session->coder")
    assert first(router.route(replace(kept, allowed=frozenset({"fast"})))) == "fast"  # the key lost that tier
    assert first(router.route(replace(kept, model="fast"))) == "fast"  # a named model is never overridden
    grown = replace(chat("word " * 500), session_tier="coder")  # past coder's 512 tokens: the next that fits
    d = router.route(grown)
    assert first(d) == "reasoning" and "too-long->reasoning" in d.reason


def test_session_tiers_remember_recent_sessions_only() -> None:
    from serving.gateway.sessions import SessionTiers
    from tests.support.clock import Clock

    clock = Clock()
    tiers = SessionTiers(max_sessions=2, ttl_s=60, clock=clock)
    tiers.remember("a", "coder")
    tiers.remember("b", "fast")
    tiers.remember("", "fast")  # no session: nothing to remember
    assert (tiers.get("a"), tiers.get("b"), tiers.get("")) == ("coder", "fast", None)
    tiers.remember("c", "reasoning")  # a is the least recently remembered: forgotten
    assert tiers.get("a") is None and tiers.get("c") == "reasoning"
    clock.t += 60
    assert tiers.get("b") is None and tiers.get("c") is None
