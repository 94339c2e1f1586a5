"""The OpenAI-compatible surface against the real app: SDK calls, streams, usage, models, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serving.config import load_config
from tests.conftest import auth

ROOT = Path(__file__).resolve().parents[2]
LOCAL = load_config(ROOT / "models.yaml", "local")
MESSAGES = [{"role": "user", "content": "write a function that adds two numbers"}]
# Random weights often emit EOS at once: force a fixed length so there is text to compare.
FIXED = {"temperature": 0, "seed": 7, "max_tokens": 12, "extra_body": {"min_tokens": 12}}


@pytest.fixture(scope="module")
def client(app_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(app_url: str, api_key: str) -> httpx.Client:
    with httpx.Client(base_url=app_url, timeout=60, headers=auth(api_key)) as c:
        yield c


@pytest.mark.parametrize("tier", ["coder", "fast", "reasoning"])
def test_every_tier_answers(client: openai.OpenAI, tier: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=tier, messages=MESSAGES, **FIXED)
    resp = raw.parse()
    assert raw.headers["x-tierserve-tier"] == tier
    assert resp.model == LOCAL.tiers[tier].served_name
    assert resp.id.startswith("chatcmpl-") and resp.created > 0
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12


def test_alias_and_served_name_resolve_to_their_tier(client: openai.OpenAI) -> None:
    by_alias = client.chat.completions.with_raw_response.create(model="qwen2.5-coder", messages=MESSAGES, **FIXED)
    by_name = client.chat.completions.create(model="tiny-coder", messages=MESSAGES, **FIXED)
    by_tier = client.chat.completions.create(model="coder", messages=MESSAGES, **FIXED)
    assert by_alias.headers["x-tierserve-tier"] == "coder"
    assert by_alias.parse().model == "tiny-coder"
    # Same engine, same seed, temperature 0: the same text whichever name was used.
    assert by_alias.parse().choices[0].message.content == by_tier.choices[0].message.content
    assert by_name.choices[0].message.content == by_tier.choices[0].message.content


def test_tiers_are_separate_engines(client: openai.OpenAI) -> None:
    texts = {t: client.chat.completions.create(model=t, messages=MESSAGES, **FIXED).choices[0].message.content
             for t in ("coder", "fast", "reasoning")}
    assert len(set(texts.values())) == 3, texts


def test_stream_joined_equals_non_streamed(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="fast", messages=MESSAGES, **FIXED)
    chunks = list(client.chat.completions.create(
        model="fast", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **FIXED
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert all(c.model == "tiny-fast" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_and_ends_with_done(http: httpx.Client) -> None:
    body = {"model": "reasoning", "messages": MESSAGES, "stream": True, "max_tokens": 5, "min_tokens": 5}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e.get("usage") is None for e in events)
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content") is not None) >= 5


def test_usage_counts_are_consistent(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(model="coder", messages=[{"role": "user", "content": "hi"}], **FIXED)
    longer = client.chat.completions.create(
        model="coder", messages=[{"role": "user", "content": "hi " * 40}], **FIXED
    )
    for resp in (short, longer):
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens


def test_text_completions_stream_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="fast", prompt="def add(a, b):", **FIXED)
    assert full.object == "text_completion" and full.model == "tiny-fast"
    assert full.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="fast", prompt="def add(a, b):", stream=True, **FIXED))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_models_lists_exactly_the_catalog(client: openai.OpenAI, app_config_path: Path) -> None:
    served = load_config(app_config_path, "test")
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == set(served.model_names()) | {"auto"}
    assert {"coder", "tiny-coder", "qwen2.5-coder", "spare", "cold"} <= set(listed)
    for name, tier in served.model_names().items():
        extra: dict[str, Any] = listed[name].model_extra or {}
        assert extra["tier"] == tier
        assert extra["served_name"] == served.tiers[tier].served_name
        assert listed[name].owned_by == "tierserve"


def test_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_32_concurrent_requests_all_succeed(app_url: str, api_key: str) -> None:
    async def run() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=f"{app_url}/v1", api_key=api_key, max_retries=0, timeout=120)
        tiers = ["coder", "fast", "reasoning"]

        async def one(i: int) -> Any:
            kwargs = {"model": tiers[i % 3], "max_tokens": 8, "extra_body": {"min_tokens": 8}, "seed": i}
            if i % 2:
                stream = await aclient.chat.completions.create(messages=MESSAGES, stream=True, **kwargs)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            resp = await aclient.chat.completions.create(messages=MESSAGES, **kwargs)
            return resp.choices[0].message.content

        try:
            return await asyncio.gather(*(one(i) for i in range(32)), return_exceptions=True)
        finally:
            await aclient.close()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(isinstance(r, str) and r for r in results)


def long_prompt() -> str:
    return "plan the deploy because the result " * 120  # well past the tiny tiers' 512-token context


ERROR_CASES = [
    # (name, raw body, status, param, code, words in message)
    ("unknown model", {"model": "nope", "messages": MESSAGES}, 404, "model", "model_not_found", "nope"),
    ("model not a string", {"model": 3, "messages": MESSAGES}, 400, "model", "invalid_value", "model"),
    ("missing model", {"messages": MESSAGES}, 400, "model", "invalid_value", "model"),
    ("missing messages", {"model": "coder"}, 400, "messages", "invalid_value", "messages"),
    ("messages wrong type", {"model": "coder", "messages": "hi"}, 400, "messages", "invalid_value", "messages"),
    ("negative max_tokens", {"model": "coder", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens",
     "invalid_value", "max_tokens"),
    ("max_tokens past context", {"model": "coder", "messages": MESSAGES, "max_tokens": 5000}, 400, "max_tokens",
     "integer_above_max_value", "max_tokens"),  # the tier's cap (its context), checked by the ingress
    ("temperature wrong type", {"model": "fast", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature",
     "invalid_value", "temperature"),
    ("stream wrong type", {"model": "fast", "messages": MESSAGES, "stream": "yes"}, 400, "stream",
     "invalid_value", "stream"),
    ("prompt too long", {"model": "coder", "messages": [{"role": "user", "content": long_prompt()}]}, 400, "messages",
     "context_length_exceeded", "maximum context length"),
    ("prompt too long, streamed", {"model": "coder", "stream": True,
                                   "messages": [{"role": "user", "content": long_prompt()}]}, 400, "messages",
     "context_length_exceeded", "maximum context length"),
    ("bad param, streamed", {"model": "fast", "stream": True, "messages": MESSAGES, "max_tokens": -1}, 400,
     "max_tokens", "invalid_value", "max_tokens"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "code", "words"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_errors_are_openai_shaped(http: httpx.Client, name: str, body: dict, status: int, param: str | None,
                                  code: str, words: str) -> None:
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")  # never a 200 stream for an early error
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert words in error["message"]


@pytest.mark.parametrize(("raw", "words"), [(b"{bad", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON")])
def test_malformed_bodies(http: httpx.Client, raw: bytes, words: str) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert words in r.json()["error"]["message"]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.delete("/v1/models")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fast", prompt=long_prompt(), max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "prompt"
