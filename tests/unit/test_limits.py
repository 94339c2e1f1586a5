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

from serving.config import ENDPOINTS, AppConfig, ConfigError, EngineArgs, LimitsConfig, ModelSource, Tier, build_config
from serving.gateway import params as limits_mod
from serving.gateway.limits import (
    check_content_length,
    check_request,
    check_tier_cap,
    read_limited,
    tier_max_tokens,
)
from serving.gateway.params import (
    API_PARAMS,
    KNOWN_PARAMS,
    PARAMS_SOURCE,
    VLLM_PARAMS_SNAPSHOT,
    allowed_params,
    vllm_params,
)
from serving.wire.errors import APIError

CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fast", "prompt": "hi"}
RESPONSES = {"model": "fast", "input": "hi"}
MESSAGES = {"model": "fast", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
COUNT_TOKENS = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
EMBEDDINGS = {"model": "embed", "input": "hi"}


def rejected(endpoint: str, body: dict[str, Any], cap: int | None = 512, **limits: Any) -> APIError:
    with pytest.raises(APIError) as info:
        check_request(endpoint, body, cap, LimitsConfig(**limits))
    return info.value


def test_defaults_are_safe() -> None:
    d = LimitsConfig()
    assert (d.max_body_bytes, d.max_messages, d.max_chars_per_message, d.max_n) == (1 << 20, 512, 200_000, 4)
    assert (d.max_tools, d.max_embedding_inputs) == (128, 2048)
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


# -- tools, and the other endpoints -------------------------------------------------------------------------------

FUNCTION = {"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "read", "arguments": '{"path": "a"}'}}


def test_chat_with_tools_passes() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "file"}]
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "read"}}, None):
        check_request("chat", {**CHAT, "messages": messages, "tools": [FUNCTION, {"type": "custom", "custom": {}}],
                               "tool_choice": choice, "parallel_tool_calls": False}, 512)
    check_request("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 128}, 512)


@pytest.mark.parametrize(
    ("change", "param", "fragment"),
    [
        ({"tools": FUNCTION}, "tools", "must be a list of tools (got dict)"),
        ({"tools": [FUNCTION] * 129}, "tools", "129 tools, more than the limit of 128"),
        ({"tools": ["read"]}, "tools[0]", "must be an object"),
        ({"tools": [{"function": {"name": "f"}}]}, "tools[0].type", "must be a string"),
        ({"tools": [FUNCTION, {"type": "function"}]}, "tools[1].function", "must be an object (got NoneType)"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name", "non-empty string"),
        ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools[0].function.name", "non-empty string"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
         "tools[0].function.parameters", "must be an object (got str)"),
        ({"tool_choice": "any"}, "tool_choice", '"none", "auto", "required" or an object'),
        ({"tool_choice": ["auto"]}, "tool_choice", "or an object"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "must be a string"),
        ({"messages": [{"role": "tool", "tool_call_id": 1, "content": "x"}]}, "messages[0].tool_call_id", "string"),
        ({"messages": [{"role": "assistant", "tool_calls": CALL}]}, "messages[0].tool_calls", "list of tool calls"),
        ({"messages": [{"role": "assistant", "tool_calls": ["c"]}]}, "messages[0].tool_calls[0]", "an object"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0].function",
         "must be an object"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {"path": "a"}}}]}]},
         "messages[0].tool_calls[0].function.arguments", "must be a string of JSON (got dict)"),
        ({"messages": [{"role": "assistant", "tool_calls": [CALL, {"function": {"arguments": "x" * 21}}]}]},
         "messages[0].tool_calls[1].function.arguments", "longer than 20 characters"),
    ],
)
def test_bad_chat_tools(change: dict[str, Any], param: str, fragment: str) -> None:
    err = rejected("chat", {**CHAT, **change}, max_chars_per_message=20)
    assert (err.status, err.param) == (400, param) and err.message.startswith(f"{param}: ") and fragment in err.message


def test_valid_requests_of_the_other_endpoints_pass() -> None:
    check_request("responses", RESPONSES, 512)
    items = [{"role": "system", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                              {"type": "input_image", "image_url": "data:x"}]},
             {"type": "function_call", "call_id": "c1", "name": "read", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "file"},
             {"type": "computer_call_output", "call_id": "c2", "output": {"type": "computer_screenshot"}}]
    check_request("responses", {
        **RESPONSES, "input": items, "instructions": "x", "max_output_tokens": 512, "store": False, "stream": True,
        "previous_response_id": "resp_1", "tools": [{"type": "function", "name": "read", "parameters": {}},
                                                    {"type": "web_search"}],
        "tool_choice": "auto", "reasoning": {"effort": "low"}, "top_k": 5,
    }, 512)
    check_request("messages", MESSAGES, 16)
    blocks = [{"type": "text", "text": "look"}, {"type": "image", "source": {"type": "base64", "data": "x"}},
              {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "ok"}]},
              {"type": "tool_result", "tool_use_id": "t2", "content": "ok", "is_error": True}]
    anthropic = {
        **MESSAGES, "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
                     {"role": "user", "content": blocks}],
        "tools": [{"name": "read", "input_schema": {"type": "object"}}, {"type": "web_search_20250305",
                                                                        "name": "web_search"}],
        "tool_choice": {"type": "auto"}, "stream": True, "top_k": 5, "stop_sequences": ["x"],
    }
    check_request("messages", anthropic, 16)
    check_request("count_tokens", COUNT_TOKENS, None)
    check_request("count_tokens", {key: v for key, v in anthropic.items() if key in KNOWN_PARAMS["count_tokens"]}, 1)
    check_request("embeddings", EMBEDDINGS, None)
    for value in (["a", "b"], [1, 2, 3], [[1, 2], [3]], ["a"] * 2048, ["a", [1]]):
        check_request("embeddings", {**EMBEDDINGS, "input": value, "dimensions": 64, "encoding_format": "base64"}, 1)


@pytest.mark.parametrize(
    ("change", "param", "fragment"),
    [
        ({"input": None}, "input", "field required"),
        ({"input": 5}, "input", "must be a string or a list of input items (got int)"),
        ({"input": []}, "input", "at least one item"),
        ({"input": [{"role": "user", "content": "x"}] * 6}, "input", "6 items, more than the limit of 5"),
        ({"input": "x" * 11}, "input", "longer than 10 characters"),
        ({"input": ["hi"]}, "input[0]", "must be an object (got str)"),
        ({"input": [{"role": "user", "content": "x" * 11}]}, "input[0].content", "longer than 10"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 11}]}]}, "input[0].content",
         "longer than 10"),
        ({"input": [{"role": "user", "content": 3}]}, "input[0].content", "must be a string or a list"),
        ({"input": [{"type": "function_call_output", "output": "x" * 11}]}, "input[0].output", "longer than 10"),
        ({"input": [{"type": "function_call", "arguments": "x" * 11}]}, "input[0].arguments", "longer than 10"),
        ({"instructions": ["x"]}, "instructions", "must be a string (got list)"),
        ({"instructions": "x" * 11}, "instructions", "longer than 10"),
        ({"previous_response_id": 7}, "previous_response_id", "must be a string"),
        ({"store": "yes"}, "store", "must be a boolean"),
        ({"max_output_tokens": 0}, "max_output_tokens", "at least 1"),
        ({"max_output_tokens": 513}, "max_output_tokens", "513 is greater than this model's cap of 512"),
        ({"max_output_tokens": "9"}, "max_output_tokens", "must be an integer"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name", "non-empty string"),
        ({"tools": [{"type": "function", "name": "f", "parameters": []}]}, "tools[0].parameters", "an object"),
        ({"tools": [{"name": "f"}]}, "tools[0].type", "must be a string"),
        ({"tools": [{"type": "web_search"}] * 6}, "tools", "6 tools, more than the limit of 5"),
        ({"tool_choice": 1}, "tool_choice", "or an object"),
        ({"stream": 1}, "stream", "must be a boolean"),
        ({"max_tokens": 5}, "max_tokens", "unknown parameter"),
        ({"messages": []}, "messages", "unknown parameter"),
    ],
)
def test_bad_responses_requests(change: dict[str, Any], param: str, fragment: str) -> None:
    body = {key: v for key, v in {**RESPONSES, **change}.items() if v is not None}
    err = rejected("responses", body, max_chars_per_message=10, max_messages=5, max_tools=5)
    assert (err.status, err.param) == (400, param) and err.message.startswith(f"{param}: ") and fragment in err.message


@pytest.mark.parametrize(
    ("change", "param", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens", "field required"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"max_tokens": 17}, "max_tokens", "17 is greater than this model's cap of 16"),
        ({"max_tokens": 1.5}, "max_tokens", "must be an integer"),
        ({"messages": None}, "messages", "field required"),
        ({"messages": {}}, "messages", "must be a list of messages"),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [{"role": "user", "content": "x"}] * 6}, "messages", "6 messages, more than the limit of 5"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", 'must be "user" or "assistant"'),
        ({"messages": [{"content": "x"}]}, "messages[0].role", 'must be "user" or "assistant"'),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "field required"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content", "list of content blocks (got int)"),
        ({"messages": [{"role": "user", "content": "x" * 11}]}, "messages[0].content", "longer than 10"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 6}, {"type": "image"},
                                                     {"type": "text", "text": "y" * 5}]}]},
         "messages[0].content", "longer than 10"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                     "content": [{"type": "text", "text": "x" * 11}]}]}]},
         "messages[0].content", "longer than 10"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", "must be an object"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type", "a string"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "string"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
         "messages[0].content[0].id", "must be a string"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "input": {}}]}]},
         "messages[0].content[0].name", "must be a string"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                          "input": "{}"}]}]},
         "messages[0].content[0].input", "must be an object (got str)"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
         "messages[0].content[0].tool_use_id", "must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]},
         "messages[0].content[0].content", "must be a string or a list"),
        ({"system": 3}, "system", "must be a string or a list of content blocks"),
        ({"system": "s" * 11}, "system", "longer than 10"),
        ({"system": [{"type": "text", "text": 1}]}, "system[0].text", "must be a string"),
        ({"tools": {"name": "f"}}, "tools", "must be a list of tools"),
        ({"tools": [{"name": "f", "input_schema": {}}] * 6}, "tools", "6 tools, more than the limit of 5"),
        ({"tools": [{"input_schema": {}}]}, "tools[0].name", "must be a non-empty string"),
        ({"tools": [{"name": "f", "input_schema": "{}"}]}, "tools[0].input_schema", "must be an object"),
        ({"tool_choice": "auto"}, "tool_choice", "must be an object"),
        ({"tool_choice": {"name": "f"}}, "tool_choice.type", "must be a string"),
        ({"stream": "true"}, "stream", "must be a boolean"),
        ({"max_completion_tokens": 5}, "max_completion_tokens", "unknown parameter"),
    ],
)
def test_bad_anthropic_messages(change: dict[str, Any], param: str, fragment: str) -> None:
    body = {key: v for key, v in {**MESSAGES, **change}.items() if v is not None}
    err = rejected("messages", body, 16, max_chars_per_message=10, max_messages=5, max_tools=5)
    assert (err.status, err.param) == (400, param) and err.message.startswith(f"{param}: ") and fragment in err.message
    if set(change) <= KNOWN_PARAMS["count_tokens"]:  # count_tokens: the same shapes, without max_tokens
        err = rejected("count_tokens", {key: v for key, v in body.items() if key != "max_tokens"}, None,
                       max_chars_per_message=10, max_messages=5, max_tools=5)
        assert err.param == param and fragment in err.message, err.message


def test_count_tokens_has_no_output_fields() -> None:
    check_request("count_tokens", {**COUNT_TOKENS, "max_tokens": 10**6}, 16, LimitsConfig(strict_params=False))
    for field in ("max_tokens", "stream"):
        err = rejected("count_tokens", {**COUNT_TOKENS, field: 1})
        assert (err.param, err.code) == (field, "unknown_parameter")


@pytest.mark.parametrize(
    ("value", "param", "fragment"),
    [
        (None, "input", "field required"),
        ("", "input", "must not be empty"),
        ("x" * 11, "input", "longer than 10 characters"),
        ([], "input", "not empty"),
        ({"text": "x"}, "input", "must be a string, a list of strings or a list of token ids"),
        (["a"] * 6, "input", "6 inputs, more than the limit of 5"),
        (list(range(11)), "input", "more than 10 tokens"),
        (["a", None], "input[1]", "must be a string or a list of token ids"),
        ([{"role": "user", "content": "x"}], "input[0]", "must be a string or a list of token ids"),
        ([[1, "2"]], "input[0]", "must be a string or a list of token ids"),
        (["a", "b" * 11], "input[1]", "longer than 10 characters"),
    ],
)
def test_bad_embedding_inputs(value: Any, param: str, fragment: str) -> None:
    body = {"model": "embed"} if value is None else {**EMBEDDINGS, "input": value}
    err = rejected("embeddings", body, None, max_chars_per_message=10, max_embedding_inputs=5)
    assert (err.status, err.param) == (400, param) and err.message.startswith(f"{param}: ") and fragment in err.message


def test_embeddings_take_no_generation_parameters() -> None:
    for field in ("max_tokens", "stream", "temperature", "n", "prompt"):
        err = rejected("embeddings", {**EMBEDDINGS, field: 1})
        assert (err.param, err.code) == (field, "unknown_parameter"), field
    assert rejected("embeddings", {**EMBEDDINGS, "priority": 1}).message.startswith("priority: not accepted")


def test_each_endpoints_output_token_field_is_capped() -> None:
    assert rejected("responses", {**RESPONSES, "max_output_tokens": 10**30}, None).param == "max_output_tokens"
    check_request("responses", {**RESPONSES, "max_output_tokens": 512}, 512)
    check_request("messages", {**MESSAGES, "max_tokens": 10**6}, None)  # no cap given: only the type
    err = rejected("messages", {**MESSAGES, "max_tokens": -2}, None)
    assert err.message == "max_tokens: must be at least 1 (got -2)"
    check_request("completion", {**COMPLETION, "max_tokens": 0}, 512)  # completions may ask for 0 tokens
    assert rejected("chat", {**CHAT, "max_tokens": 0}).param == "max_tokens"


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


def test_allow_list_is_the_public_api_plus_vllm() -> None:
    assert set(API_PARAMS) == set(KNOWN_PARAMS) == set(ENDPOINTS)
    for endpoint in ENDPOINTS:
        assert API_PARAMS[endpoint] <= KNOWN_PARAMS[endpoint]
        assert PARAMS_SOURCE[endpoint] in {"vllm-model", "vllm-source", "static"}
        assert "model" in KNOWN_PARAMS[endpoint]
        assert not {"priority", "request_id"} & allowed_params(endpoint, LimitsConfig())
    for endpoint in ("chat", "completion"):
        assert {"top_k", "min_p", "repetition_penalty", "stop_token_ids"} <= KNOWN_PARAMS[endpoint]
    assert "messages" in KNOWN_PARAMS["chat"] and "messages" not in KNOWN_PARAMS["completion"]
    assert {"chat_template_kwargs", "max_completion_tokens"} <= KNOWN_PARAMS["chat"]
    # The Responses API: OpenAI's fields, and vLLM's sampling extras.
    assert {"input", "instructions", "previous_response_id", "store", "max_output_tokens", "reasoning", "text",
            "include", "background", "conversation", "top_k", "min_p"} <= KNOWN_PARAMS["responses"]
    assert not {"messages", "max_tokens", "n"} & KNOWN_PARAMS["responses"]
    # Anthropic's Messages API; count_tokens generates nothing.
    assert {"messages", "max_tokens", "system", "stop_sequences", "thinking", "top_k", "container",
            "mcp_servers"} <= KNOWN_PARAMS["messages"]
    assert not {"max_completion_tokens", "n", "stop", "input"} & KNOWN_PARAMS["messages"]
    assert {"messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"} <= KNOWN_PARAMS["count_tokens"]
    assert not {"max_tokens", "stream", "temperature"} & KNOWN_PARAMS["count_tokens"]
    # Embeddings: OpenAI's fields, and those of every model of vLLM's union (completion- and chat-style).
    assert {"input", "dimensions", "encoding_format", "user", "truncate_prompt_tokens", "add_special_tokens",
            "messages", "chat_template_kwargs", "embed_dtype"} <= KNOWN_PARAMS["embeddings"]
    assert not {"max_tokens", "stream", "temperature", "n"} & KNOWN_PARAMS["embeddings"]


def test_source_parse_matches_the_snapshot_when_vllm_is_installed() -> None:
    """The static fallback equals what the parser reads from the installed vLLM (refresh it on upgrade)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here")
    assert set(VLLM_PARAMS_SNAPSHOT) == set(ENDPOINTS)
    for endpoint in ENDPOINTS:
        parsed = limits_mod._fields_from_source(endpoint)
        assert parsed is not None, f"can't read vLLM's {endpoint} request model any more: update _VLLM_MODELS"
        assert parsed == VLLM_PARAMS_SNAPSHOT[endpoint], (endpoint, parsed ^ VLLM_PARAMS_SNAPSHOT[endpoint])


def test_source_parse_equals_vllms_live_model_fields() -> None:  # imports vLLM in a child: 15-40 s
    """The parser reads exactly what pydantic sees (aliases included). vLLM is imported in a child process,
    since importing it takes seconds and would make the rest of this process use the live models."""
    if limits_mod._fields_from_source("chat") is None:
        pytest.skip("vLLM is not installed here")
    modules = sorted({module for module, _ in limits_mod._VLLM_MODELS.values()})
    code = (
        "import importlib, json\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        "from serving.gateway.params import _fields_from_live_model as live\n"
        f"print(json.dumps({{e: sorted(live(e)) for e in {list(ENDPOINTS)!r}}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    live = json.loads(proc.stdout.strip().splitlines()[-1])
    for endpoint in ENDPOINTS:
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
    assert limits_mod._class_fields(tree, "Foreign", imported={"SomethingImported": {"z"}}.get) == {"c", "z"}


def test_parser_follows_bases_into_other_vllm_modules(tmp_path: Path) -> None:
    """Absolute and relative `from ... import`s, mixins without a base, re-exports; a base from outside vLLM's
    package, or an import cycle, is unresolvable."""
    files = {
        "__init__.py": "",
        "base/__init__.py": "from vllm.base.mixins import Mixin as Reexported\n",
        "base/mixins.py": "class Plain:\n    flag: bool\nclass Mixin(OpenAIBaseModel, Plain):\n    m: int = 0\n",
        "api/protocol.py": (
            "from ..base.mixins import Mixin\nfrom vllm.base import Reexported\nfrom pydantic import RootModel\n"
            "from .loop import A\n"
            "class Req(Mixin):\n    r: str\nclass Again(Reexported):\n    g: int\n"
            "class Outside(RootModel):\n    o: int\nclass Looped(A):\n    x: int\n"
        ),
        "api/loop.py": "from .protocol import Looped as A\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    source = limits_mod._VllmSource(tmp_path)
    assert source.class_fields("vllm.api.protocol", "Req") == {"flag", "m", "r"}
    assert source.class_fields("vllm.api.protocol", "Again") == {"flag", "m", "g"}
    assert source.class_fields("vllm.base", "Reexported") == {"flag", "m"}
    assert source.class_fields("vllm.api.protocol", "Outside") is None
    assert source.class_fields("vllm.api.protocol", "Looped") is None
    assert source.class_fields("vllm.api.missing", "Req") is None


def test_fallback_to_the_static_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(limits_mod, "_fields_from_live_model", lambda endpoint: None)
    for endpoint in ENDPOINTS:
        assert vllm_params(endpoint) == (VLLM_PARAMS_SNAPSHOT[endpoint], "static")


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
    # Each endpoint's own output-token field: the default is chat's.
    check_tier_cap({"max_output_tokens": 10**6}, 256)
    check_tier_cap({"max_tokens": 10**6}, 256, "embeddings")
    check_tier_cap({"max_tokens": 10**6}, 256, "count_tokens")
    for endpoint, field in (("responses", "max_output_tokens"), ("messages", "max_tokens"),
                            ("completion", "max_tokens")):
        with pytest.raises(APIError) as err:
            check_tier_cap({field: 257}, 256, endpoint)
        assert err.value.param == field and err.value.message.startswith(f"{field}: 257 is greater"), endpoint


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
        check_request("images", {}, None)
    assert info.value.status == 404


def test_module_is_cheap_and_never_imports_vllm() -> None:
    code = ("import sys, serving.gateway.limits, serving.gateway.params as m; "
            "print(m.PARAMS_SOURCE['chat'], *(x in sys.modules for x in ('vllm', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out[1:] == ["False", "False"] and out[0] in {"vllm-source", "static"}
