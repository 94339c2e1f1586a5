"""Admission with the real key store, limiter and router (no Ray): one entry per request, refusals accounted
once, and what a finished request is charged to its key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from serving.config import Tier
from serving.gateway.admission import Admission, parse_json_object
from serving.gateway.router import Decision, RequestFacts, Router
from serving.security.keys import KeySpec
from serving.spend.pricing import local_spend
from serving.wire.errors import APIError
from serving.wire.items import Usage
from tests.support.gateway import Parts, gateway_config, gateway_parts, http_request


def tier(**over: object) -> Tier:
    return Tier.model_validate({"served_name": "t", "model": {"tiny_seed": 1}, **over})


def test_local_request_cost_is_its_duration_at_the_tiers_hourly_price() -> None:
    gpu_tier = tier(resources={"gpus": 0.5}, cost_per_gpu_hour_usd=2.0)
    spend = local_spend(gpu_tier, 36.0, 10, 20)
    assert spend.gpu_seconds == pytest.approx(18.0)  # 36 s x 0.5 GPU
    assert spend.cost_usd == pytest.approx(0.01)  # 36 s of ($2/GPU-hour x 0.5 GPU)
    assert (spend.prompt_tokens, spend.completion_tokens) == (10, 20)
    # An explicit hourly price wins (a CPU tier has no GPUs to price).
    assert local_spend(tier(cost_per_hour_usd=3600.0), 0.5, 0, 0).cost_usd == pytest.approx(0.5)
    assert local_spend(tier(), 100.0, 1, 1).cost_usd == 0.0


@pytest.mark.parametrize(("raw", "words", "code"), [(b"{", "not valid JSON", "invalid_json"),
                                                    (b"[]", "got list", "invalid_value"),
                                                    (b"\xff", "not valid JSON", "invalid_json")])
def test_bodies_must_be_json_objects(raw: bytes, words: str, code: str) -> None:
    with pytest.raises(APIError) as err:
        parse_json_object(raw)
    assert err.value.status == 400 and words in err.value.message and err.value.code == code


# -- admit: one entry per request, every refusal accounted once -----------------------------------------------


def body(**over: object) -> bytes:
    return orjson.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}], **over})


def admit_with(parts: Parts, raw: bytes, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    routed: list[RequestFacts] = []
    router = Router(parts.config)

    def route(facts: RequestFacts) -> Decision:
        routed.append(facts)
        return router.route(facts)

    admission = Admission(parts.config, parts.keys, parts.limiter, parts.accounting)
    return asyncio.run(admission.admit(http_request(raw, headers), "chat", route)), routed


def test_an_admitted_request_carries_its_key_decision_and_ticket(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path)
    plaintext, key = parts.keys.create(KeySpec(agent="coder-bot", rpm=2))
    admitted, routed = admit_with(parts, body(stream=True), {"authorization": f"Bearer {plaintext}"})
    assert admitted.key.id == key.id and admitted.decision.tier == "fast" and admitted.stream
    assert len(routed) == 1 and routed[0].default_tier is None and admitted.facts is routed[0]
    assert parts.limiter.window(key)["requests"] == 1  # counted against the key's rate once
    assert parts.sample("tierserve_requests_in_flight", tier="fast") == 1
    parts.clock.t += 36  # the fast tier costs $36 an hour: 36 s is $0.36
    admitted.ticket.finish(200, Usage(7, 3))
    usage = parts.limiter.usage(key)
    assert (usage["day"]["requests"], usage["day"]["prompt_tokens"]) == (1, 7)
    assert usage["day"]["cost_usd"] == pytest.approx(0.36)
    assert parts.sample("tierserve_requests_in_flight", tier="fast") == 0
    assert parts.sample("tierserve_agent_requests_total", agent="coder-bot", status="200") == 1


@pytest.mark.parametrize(
    ("raw", "spec", "status", "tier"),
    [
        (body(), None, 401, "none"),  # no key: never reads the body
        (b"[1]", {}, 400, "none"),
        (body(colour="blue"), {}, 400, "none"),  # an unknown parameter
        (body(model="gpt-9"), {}, 404, "none"),
        (body(model="coder"), {"tiers": ("fast",)}, 403, "coder"),  # refused after routing: the tier is known
        (body(max_tokens=65), {}, 400, "fast"),  # past the fast tier's max_tokens_cap
    ],
)
def test_refusals_are_accounted_once_and_never_counted_against_the_rate(
    tmp_path: Path, raw: bytes, spec: dict | None, status: int, tier: str
) -> None:
    parts = gateway_parts(tmp_path, gateway_config(auth={"enabled": True}))
    headers = {}
    key = None
    if spec is not None:
        plaintext, key = parts.keys.create(KeySpec(agent="bot", **spec))
        headers = {"authorization": f"Bearer {plaintext}"}
    with pytest.raises(APIError) as err:
        admit_with(parts, raw, headers)
    assert err.value.status == status
    agent = "bot" if key else "unauthenticated"
    assert parts.sample("tierserve_agent_requests_total", agent=agent, status=str(status)) == 1
    assert parts.sample("tierserve_requests_total", tier=tier, provider="local", endpoint="chat",
                        status=str(status)) == 1
    if key is not None:
        assert parts.limiter.window(key)["requests"] == 0


def test_the_rate_limit_refuses_with_retry_after(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path)
    plaintext, _ = parts.keys.create(KeySpec(agent="bot", rpm=1))
    auth = {"authorization": f"Bearer {plaintext}"}
    admit_with(parts, body(), auth)[0].ticket.finish(200)
    with pytest.raises(APIError) as err:
        admit_with(parts, body(), auth)
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    assert 1 <= int(err.value.headers["retry-after"]) <= 60
    assert parts.sample("tierserve_requests_total", tier="fast", provider="local", endpoint="chat", status="429") == 1
