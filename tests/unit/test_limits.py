"""Input limits: body size and upload time, per-field limits naming the field, the strict parameter allow-list
(computed from vLLM's request models without importing vLLM), and the config that drives them."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from serving.config import AppConfig, ConfigError, EngineArgs, LimitsConfig, ModelSource, Tier, build_config
from serving.gateway import limits as limits_mod
from serving.gateway.limits import (
    KNOWN_PARAMS,
    OPENAI_PARAMS,
    PARAMS_SOURCE,
    VLLM_PARAMS_SNAPSHOT,
    allowed_params,
    check_content_length,
    check_request,
    check_tier_cap,
    read_limited,
    tier_max_tokens,
    vllm_params,
)
from serving.wire.errors import APIError

CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fast", "prompt": "hi"}


def rejected(endpoint: str, body: dict[str, Any], cap: int | None = 512, **limits: Any) -> APIError:
    with pytest.raises(APIError) as info:
        check_request(endpoint, body, cap, LimitsConfig(**limits))
    return info.value


def test_defaults_are_safe() -> None:
    d = LimitsConfig()
    assert (d.max_body_bytes, d.max_messages, d.max_chars_per_message, d.max_n) == (1 << 20, 512, 200_000, 4)
    assert d.strict_params and d.max_tokens_cap is None
    assert AppConfig.model_validate({"tiers": {"fast": tier()}}).limits == d


def tier(**kw: Any) -> Tier:
    return Tier(served_name="tiny", model=ModelSource(tiny_seed=1), engine=EngineArgs(max_model_len=4096), **kw)


def test_valid_requests_pass() -> None:
    check_request("chat", CHAT, 512)
    check_request("chat", {**CHAT, "max_tokens": 512, "n": 4, "stream": True, "top_k": 5, "store": False}, 512)
    check_request("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                                 {"role": "assistant", "content": None, "tool_calls": []}]}, 512)
    check_request("completion", COMPLETION, 512)
    for prompt in (["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        check_request("completion", {**COMPLETION, "prompt": prompt, "max_tokens": 0, "echo": True}, 512)
    check_request("chat", {**CHAT, "max_tokens": 10**6}, None)  # no cap given: only the type is checked


def test_message_too_long_names_the_field() -> None:
    messages = [{"role": "user", "content": "x"}] * 3 + [{"role": "user", "content": "y" * 200_001}]
    err = rejected("chat", {**CHAT, "messages": messages})
    assert (err.status, err.param, err.code) == (400, "messages[3].content", "string_above_max_length")
    assert err.message == "messages[3].content: longer than 200000 characters"
    parts = [{"type": "text", "text": "a" * 6}, {"type": "image_url", "image_url": {"url": "data:" + "z" * 99}},
             {"type": "text", "text": "b" * 5}]
    err = rejected("chat", {**CHAT, "messages": [{"role": "user", "content": parts}]}, max_chars_per_message=10)
    assert err.param == "messages[0].content"  # text parts are summed; other parts are the body limit's job
    check_request("chat", {**CHAT, "messages": [{"role": "user", "content": parts[:2]}]}, 512,
                  LimitsConfig(max_chars_per_message=10))


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        (None, "messages", "field required"),
        ("hi", "messages", "must be a list"),
        ([], "messages", "at least one"),
        ([{"role": "user", "content": "x"}] * 513, "messages", "513 messages, more than the limit of 512"),
        (["hi"], "messages[0]", "must be an object"),
        ([{"content": "x"}], "messages[0].role", "must be a string"),
        ([{"role": "user", "content": 5}], "messages[0].content", "must be a string or a list"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content[0]", "must be an object"),
    ],
)
def test_bad_messages(messages: Any, param: str, fragment: str) -> None:
    body = {"model": "fast"} if messages is None else {**CHAT, "messages": messages}
    err = rejected("chat", body)
    assert err.status == 400 and err.param == param and fragment in err.message and err.message.startswith(param)


@pytest.mark.parametrize(
    ("prompt", "param", "fragment"),
    [
        (None, "prompt", "field required"),
        ("p" * 11, "prompt", "longer than 10"),
        ([], "prompt", "not empty"),
        (["a"] * 6, "prompt", "6 prompts"),
        (["a", 1], "prompt[1]", "string or a list of token ids"),
        ([[1, "x"]], "prompt[0]", "string or a list of token ids"),
        (["a", "b" * 11], "prompt[1]", "longer than 10"),
        (list(range(11)), "prompt", "more than 10 tokens"),
        ({"a": 1}, "prompt", "must be a string"),
    ],
)
def test_bad_prompts(prompt: Any, param: str, fragment: str) -> None:
    body = {"model": "fast"} if prompt is None else {**COMPLETION, "prompt": prompt}
    err = rejected("completion", body, max_chars_per_message=10, max_messages=5)
    assert err.status == 400 and err.param == param and fragment in err.message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("n", 5, "greater than this server's limit of 4"),
        ("n", 0, "at least 1"),
        ("n", "2", "must be an integer"),
        ("n", True, "must be an integer"),
        ("max_tokens", 513, "513 is greater than this model's cap of 512"),
        ("max_tokens", -1, "at least 1"),
        ("max_tokens", 0, "at least 1"),
        ("max_tokens", 1.5, "must be an integer"),
        ("max_tokens", 10**30, "greater than this model's cap"),
        ("max_completion_tokens", 600, "greater than this model's cap"),
        ("stream", "yes", "must be a boolean"),
    ],
)
def test_numeric_caps_name_the_field(field: str, value: Any, fragment: str) -> None:
    err = rejected("chat", {**CHAT, field: value})
    assert err.status == 400 and err.param == field and fragment in err.message, err.message


def test_huge_max_tokens_is_refused_even_without_a_cap() -> None:
    assert rejected("chat", {**CHAT, "max_tokens": -5}, None).param == "max_tokens"
    assert rejected("completion", {**COMPLETION, "max_tokens": 2**64}, None).param == "max_tokens"


def test_unknown_and_denied_parameters() -> None:
    err = rejected("chat", {**CHAT, "temprature": 0.5, "foo": 1})
    assert (err.status, err.param, err.code) == (400, "foo", "unknown_parameter")
    assert err.message == "foo: unknown parameter(s): foo, temprature"
    assert rejected("completion", {**COMPLETION, "messages": []}).param == "messages"  # chat-only field
    assert rejected("chat", {**CHAT, "suffix": "x"}).param == "suffix"  # completion-only field
    err = rejected("chat", {**CHAT, "priority": -100, "request_id": "x"})
    assert err.param == "priority" and "not accepted by this server: priority, request_id" in err.message
    # Relaxed: unknown fields pass, denied ones still don't; extra_params and denied_params are configurable.
    check_request("chat", {**CHAT, "foo": 1}, 512, LimitsConfig(strict_params=False))
    assert rejected("chat", {**CHAT, "priority": 1}, strict_params=False).param == "priority"
    check_request("chat", {**CHAT, "foo": 1, "priority": 1}, 512, LimitsConfig(extra_params=["foo"], denied_params=[]))


def test_allow_list_is_openai_plus_vllm() -> None:
    for endpoint in ("chat", "completion"):
        assert OPENAI_PARAMS[endpoint] <= KNOWN_PARAMS[endpoint]
        assert {"top_k", "min_p", "repetition_penalty", "stop_token_ids"} <= KNOWN_PARAMS[endpoint]
        assert PARAMS_SOURCE[endpoint] in {"vllm-model", "vllm-source", "static"}
        assert "priority" not in allowed_params(endpoint, LimitsConfig())
    assert "messages" in KNOWN_PARAMS["chat"] and "messages" not in KNOWN_PARAMS["completion"]
    assert {"chat_template_kwargs", "max_completion_tokens"} <= KNOWN_PARAMS["chat"]


def test_source_parse_matches_the_snapshot_when_vllm_is_installed() -> None:
    """The static fallback equals what the parser reads from the installed vLLM (refresh it on upgrade)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here")
    for endpoint in ("chat", "completion"):
        parsed = limits_mod._fields_from_source(endpoint)
        assert parsed is not None, f"can't read vLLM's {endpoint} request model any more: update _VLLM_MODELS"
        assert parsed == VLLM_PARAMS_SNAPSHOT[endpoint], endpoint


def test_source_parse_equals_vllms_live_model_fields() -> None:  # imports vLLM in a child: 15-40 s
    """The parser reads exactly what pydantic sees (aliases included). vLLM is imported in a child process,
    since importing it takes seconds and would make the rest of this process use the live models."""
    if limits_mod._fields_from_source("chat") is None:
        pytest.skip("vLLM is not installed here")
    code = (
        "import json\n"
        "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as C\n"
        "from vllm.entrypoints.openai.completion.protocol import CompletionRequest as P\n"
        "from serving.gateway.limits import _fields_from_live_model as live\n"
        "print(json.dumps({e: sorted(live(e)) for e in ('chat', 'completion')}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    live = json.loads(proc.stdout.strip().splitlines()[-1])
    for endpoint in ("chat", "completion"):
        assert set(live[endpoint]) == limits_mod._fields_from_source(endpoint), endpoint


def test_parser_follows_in_module_bases_and_skips_classvars() -> None:
    tree = ast.parse(
        "class Base(OpenAIBaseModel):\n    a: int = 1\n    cache: ClassVar[set[str] | None] = None\n"
        "class Req(Base):\n    b: str = Field(None, alias='bee')\n    _private: int = 0\n"
        "class Foreign(SomethingImported):\n    c: int\n"
    )
    assert limits_mod._class_fields(tree, "Req") == {"a", "b", "bee"}
    assert limits_mod._class_fields(tree, "Foreign") is None  # can't see the base: don't guess
    assert limits_mod._class_fields(tree, "Missing") is None


def test_fallback_to_the_static_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(limits_mod, "_fields_from_live_model", lambda endpoint: None)
    assert vllm_params("chat") == (VLLM_PARAMS_SNAPSHOT["chat"], "static")


def test_tier_caps() -> None:
    assert tier_max_tokens(tier(), LimitsConfig()) == 4096
    assert tier_max_tokens(tier(), LimitsConfig(max_tokens_cap=1024)) == 1024
    assert tier_max_tokens(tier(max_tokens_cap=256), LimitsConfig(max_tokens_cap=1024)) == 256
    assert tier_max_tokens(tier(max_tokens_cap=10**6), LimitsConfig()) == 4096  # never past the context
    check_tier_cap({"max_tokens": 256}, 256)
    with pytest.raises(APIError) as err:
        check_tier_cap({"max_completion_tokens": 257}, 256)
    assert (err.value.status, err.value.param) == (400, "max_completion_tokens")
    assert err.value.code == "integer_above_max_value"


def test_config_sections_parse_and_bad_values_name_their_path() -> None:
    base = {"tiers": {"fast": {"served_name": "f", "model": {"tiny_seed": 1}, "max_tokens_cap": 128}}}
    config = build_config({**base, "auth": {"enabled": False, "log_prompts": True},
                           "limits": {"max_n": 2, "extra_params": ["metadata2"]}}, None)
    assert not config.auth.enabled and config.auth.log_prompts and config.limits.max_n == 2
    assert config.tiers["fast"].max_tokens_cap == 128
    for bad, path in (({"auth": {"enable": False}}, "auth.enable: unknown field"),
                      ({"limits": {"max_n": 0}}, "limits.max_n"),
                      ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes")):
        with pytest.raises(ConfigError) as info:
            build_config({**base, **bad}, None)
        assert any(p.startswith(path) for p in info.value.problems), info.value.problems


# -- the body -------------------------------------------------------------------------------------------------


async def chunks(parts: list[bytes], delay: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part


def test_declared_length_over_the_limit_is_413_before_reading() -> None:
    read: list[bytes] = []

    async def spy() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x"

    with pytest.raises(APIError) as info:
        asyncio.run(read_limited(spy(), LimitsConfig(max_body_bytes=100), content_length="101"))
    assert (info.value.status, info.value.code) == (413, "request_too_large") and read == []
    with pytest.raises(APIError) as info:
        check_content_length("ten", LimitsConfig())
    assert info.value.status == 400
    check_content_length(None, LimitsConfig())


def test_chunked_body_is_cut_at_the_limit() -> None:
    limits = LimitsConfig(max_body_bytes=10)
    assert asyncio.run(read_limited(chunks([b"12345", b"67890"]), limits)) == b"1234567890"
    with pytest.raises(APIError) as info:
        asyncio.run(read_limited(chunks([b"12345", b"67890", b"1"]), limits, content_length="5"))  # it lied
    assert info.value.status == 413


def test_slow_upload_is_408() -> None:
    limits = LimitsConfig(body_timeout_s=0.05)
    with pytest.raises(APIError) as info:
        asyncio.run(read_limited(chunks([b"a"] * 10, delay=0.02), limits))
    assert (info.value.status, info.value.code) == (408, "timeout")
    assert info.value.body()["error"]["type"] == "timeout_error"


def test_unknown_endpoint() -> None:
    with pytest.raises(APIError) as info:
        check_request("embeddings", {}, None)
    assert info.value.status == 404


def test_module_is_cheap_and_never_imports_vllm() -> None:
    code = ("import sys, serving.gateway.limits as m; "
            "print(m.PARAMS_SOURCE['chat'], *(x in sys.modules for x in ('vllm', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out[1:] == ["False", "False"] and out[0] in {"vllm-source", "static"}
