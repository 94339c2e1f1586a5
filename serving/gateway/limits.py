"""Input limits: what the ingress checks before a request reaches a tier. Pure; raises APIError 400/408/413.

Body size (413, while reading, before JSON parsing), slow uploads (408), then per field: messages (or input
items) per request, characters per message, tools per request, `n`, the output-token field against the tier's
cap, and the strict parameter check against each endpoint's allow-list (serving/gateway/params.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeGuard

from serving.config import ENDPOINTS, LimitsConfig, Tier
from serving.gateway.params import allowed_params
from serving.wire.errors import APIError

_INT64_MAX = 2**63 - 1


# -- effective limits ---------------------------------------------------------------------------------------------


def tier_max_tokens(tier: Tier, limits: LimitsConfig) -> int:
    """The `max_tokens` cap of a tier: its `max_tokens_cap`, else `limits.max_tokens_cap`, never past its context."""
    cap = tier.max_tokens_cap or limits.max_tokens_cap or tier.engine.max_model_len
    return min(cap, tier.engine.max_model_len)


# -- the body -----------------------------------------------------------------------------------------------------


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def check_content_length(header_value: str | None, limits: LimitsConfig) -> None:
    """413 at once when the declared length is over the limit (the body is then never read)."""
    if header_value is None:
        return
    try:
        length = int(header_value)
    except ValueError:
        raise APIError(400, "content-length: not an integer", code="invalid_value") from None
    if length > limits.max_body_bytes:
        raise _too_large(limits.max_body_bytes)


async def read_limited(
    chunks: AsyncIterable[bytes], limits: LimitsConfig, content_length: str | None = None
) -> bytes:
    """Read a request body (e.g. `request.stream()`): 413 as soon as it passes `max_body_bytes` (chunked
    uploads too, so a 10 MB body is never held), 408 when the upload takes longer than `body_timeout_s`."""
    check_content_length(content_length, limits)
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in chunks:
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _too_large(limits.max_body_bytes)
                parts.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body not received within {limits.body_timeout_s:g}s", code="timeout") from None
    return b"".join(parts)


# -- fields -------------------------------------------------------------------------------------------------------


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _too_long(param: str, limits: LimitsConfig) -> APIError:
    return _bad(param, f"longer than {limits.max_chars_per_message} characters", code="string_above_max_length")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(body: dict[str, Any], name: str, low: int, high: int, what: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_int(value):
        raise _bad(name, f"must be an integer (got {type(value).__name__})")
    if value < low:
        raise _bad(name, f"must be at least {low} (got {value})")
    if value > high:
        raise _bad(name, f"{value} is greater than {what} of {high}", code="integer_above_max_value")


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(param, f"must be an object (got {type(value).__name__})")
    return value


def _check_type(body: dict[str, Any], name: str, kind: type, what: str) -> None:
    """`body[name]`, when present and not null, is a `kind`."""
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise _bad(name, f"must be {what} (got {type(value).__name__})")


def _check_list(value: Any, param: str, limit: int, noun: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(param, f"must be a list of {noun} (got {type(value).__name__})")
    if len(value) > limit:
        raise _bad(param, f"{len(value)} {noun}, more than the limit of {limit}", code="array_above_max_length")
    return value


def _text_chars(content: Any, param: str) -> int:
    """Characters of a message's content: a string, or the `text` of its parts; None is empty."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise _bad(param, f"must be a string or a list of content parts (got {type(content).__name__})")
    total = 0
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _bad(f"{param}[{j}]", f"must be an object (got {type(part).__name__})")
        text = part.get("text")
        if isinstance(text, str):
            total += len(text)
    return total


def _message_list(body: dict[str, Any], limits: LimitsConfig) -> list[Any]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "field required")
    _check_list(messages, "messages", limits.max_messages, "messages")
    if not messages:
        raise _bad("messages", "must contain at least one message")
    return messages


def _check_tool_definition(tool: dict[str, Any], param: str, schema: str) -> None:
    """A function tool: a name to call it by, and its JSON schema (`schema`) an object when given."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{param}.name", "must be a non-empty string")
    if tool.get(schema) is not None and not isinstance(tool[schema], dict):
        raise _bad(f"{param}.{schema}", f"must be an object (got {type(tool[schema]).__name__})")


def _check_openai_tools(body: dict[str, Any], limits: LimitsConfig, flat: bool) -> None:
    """`tools` of chat (`{type, function: {name, parameters}}`) or of the Responses API (`flat`: `{type, name,
    parameters}`), and `tool_choice`."""
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(_check_list(tools, "tools", limits.max_tools, "tools")):
            param = f"tools[{i}]"
            tool = _object(tool, param)
            if not isinstance(tool.get("type"), str):
                raise _bad(f"{param}.type", "must be a string")
            if tool["type"] != "function":
                continue  # built-in tools (web search, MCP...): their shapes are vLLM's to check
            if flat:
                _check_tool_definition(tool, param, "parameters")
            else:
                _check_tool_definition(_object(tool.get("function"), f"{param}.function"), f"{param}.function",
                                       "parameters")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
        raise _bad("tool_choice", 'must be "none", "auto", "required" or an object')


def _check_tool_calls(calls: Any, param: str, limits: LimitsConfig) -> None:
    """An assistant message's `tool_calls`: their arguments are JSON text, limited like a message."""
    if not isinstance(calls, list):
        raise _bad(param, f"must be a list of tool calls (got {type(calls).__name__})")
    for j, call in enumerate(calls):
        function = _object(_object(call, f"{param}[{j}]").get("function"), f"{param}[{j}].function")
        arguments = function.get("arguments")
        where = f"{param}[{j}].function.arguments"
        if not isinstance(arguments, str):
            raise _bad(where, f"must be a string of JSON (got {type(arguments).__name__})")
        if len(arguments) > limits.max_chars_per_message:
            raise _too_long(where, limits)


def _check_messages(body: dict[str, Any], limits: LimitsConfig) -> None:
    """Chat: `messages`, and the tool fields that travel with them."""
    for i, message in enumerate(_message_list(body, limits)):
        message = _object(message, f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role", "must be a string")
        param = f"messages[{i}].content"
        if _text_chars(message.get("content"), param) > limits.max_chars_per_message:
            raise _too_long(param, limits)
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _bad(f"messages[{i}].tool_call_id", "must be a string")
        if role == "assistant" and message.get("tool_calls") is not None:
            _check_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls", limits)
    _check_openai_tools(body, limits, flat=False)


def _check_inputs(
    body: dict[str, Any], name: str, limits: LimitsConfig, max_items: int, noun: str, empty_ok: bool = True
) -> None:
    """A completion's `prompt` or an embedding's `input`: a string, a list of strings, token ids, or a list of
    token-id lists."""
    value = body.get(name)
    if value is None:
        raise _bad(name, "field required")
    if isinstance(value, str):
        if not value and not empty_ok:
            raise _bad(name, "must not be empty")
        if len(value) > limits.max_chars_per_message:
            raise _too_long(name, limits)
        return
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a string, a list of strings or a list of token ids, not empty")
    if all(_is_int(t) for t in value):  # one input as token ids
        if len(value) > limits.max_chars_per_message:
            raise _bad(name, f"more than {limits.max_chars_per_message} tokens", code="array_above_max_length")
        return
    if len(value) > max_items:
        raise _bad(name, f"{len(value)} {noun}, more than the limit of {max_items}", code="array_above_max_length")
    for i, item in enumerate(value):
        ok_tokens = isinstance(item, list) and all(_is_int(t) for t in item)
        if not (isinstance(item, str) or ok_tokens):
            raise _bad(f"{name}[{i}]", "must be a string or a list of token ids")
        if len(item) > limits.max_chars_per_message:
            raise _too_long(f"{name}[{i}]", limits)


def _check_prompt(body: dict[str, Any], limits: LimitsConfig) -> None:
    _check_inputs(body, "prompt", limits, limits.max_messages, "prompts")


def _check_embeddings(body: dict[str, Any], limits: LimitsConfig) -> None:
    _check_inputs(body, "input", limits, limits.max_embedding_inputs, "inputs", empty_ok=False)


def _check_responses(body: dict[str, Any], limits: LimitsConfig) -> None:
    """The Responses API: `input` (text, or items: messages, function calls and their outputs...), `instructions`,
    tools, and the state fields."""
    items = body.get("input")
    if items is None:
        raise _bad("input", "field required")
    if isinstance(items, str):
        if len(items) > limits.max_chars_per_message:
            raise _too_long("input", limits)
    else:
        if not isinstance(items, list):
            raise _bad("input", f"must be a string or a list of input items (got {type(items).__name__})")
        if not items:
            raise _bad("input", "must contain at least one item")
        if len(items) > limits.max_messages:
            raise _bad("input", f"{len(items)} items, more than the limit of {limits.max_messages}",
                       code="array_above_max_length")
        for i, item in enumerate(items):
            item = _object(item, f"input[{i}]")
            param = f"input[{i}].content"
            if _text_chars(item.get("content"), param) > limits.max_chars_per_message:
                raise _too_long(param, limits)
            # A tool's output and a call's arguments are prompt text too; other shapes of them are vLLM's to check.
            for key in ("output", "arguments"):
                value = item.get(key)
                if isinstance(value, str | list) and _text_chars(value, f"input[{i}].{key}") > \
                        limits.max_chars_per_message:
                    raise _too_long(f"input[{i}].{key}", limits)
    _check_type(body, "instructions", str, "a string")
    if len(body.get("instructions") or "") > limits.max_chars_per_message:
        raise _too_long("instructions", limits)
    _check_type(body, "previous_response_id", str, "a string")
    _check_type(body, "store", bool, "a boolean")
    _check_openai_tools(body, limits, flat=True)


def _block_chars(content: Any, param: str) -> int:
    """Characters of Anthropic content: a string, or the text of its blocks (a tool result's content included);
    checks the shapes of the blocks that routing and the tool-call plumbing read."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        raise _bad(param, f"must be a string or a list of content blocks (got {type(content).__name__})")
    total = 0
    for j, block in enumerate(content):
        where = f"{param}[{j}]"
        block = _object(block, where)
        kind = block.get("type")
        if not isinstance(kind, str):
            raise _bad(f"{where}.type", "must be a string")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _bad(f"{where}.text", "must be a string")
            total += len(block["text"])
        elif kind == "tool_use":
            for key in ("id", "name"):
                if not isinstance(block.get(key), str):
                    raise _bad(f"{where}.{key}", "must be a string")
            _object(block.get("input"), f"{where}.input")
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"{where}.tool_use_id", "must be a string")
            total += _text_chars(block.get("content"), f"{where}.content")  # a string or text/image blocks
    return total


def _check_anthropic(body: dict[str, Any], limits: LimitsConfig) -> None:
    """Anthropic's Messages API (and count_tokens): `messages` of user and assistant turns, `system`, tools."""
    for i, message in enumerate(_message_list(body, limits)):
        message = _object(message, f"messages[{i}]")
        if message.get("role") not in ("user", "assistant"):
            raise _bad(f"messages[{i}].role", 'must be "user" or "assistant"')
        param = f"messages[{i}].content"
        if message.get("content") is None:
            raise _bad(param, "field required")
        if _block_chars(message["content"], param) > limits.max_chars_per_message:
            raise _too_long(param, limits)
    if body.get("system") is not None and _block_chars(body["system"], "system") > limits.max_chars_per_message:
        raise _too_long("system", limits)
    tools = body.get("tools")
    if tools is not None:
        for i, tool in enumerate(_check_list(tools, "tools", limits.max_tools, "tools")):
            _check_tool_definition(_object(tool, f"tools[{i}]"), f"tools[{i}]", "input_schema")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(_object(choice, "tool_choice").get("type"), str):
        raise _bad("tool_choice.type", "must be a string")


def _check_messages_api(body: dict[str, Any], limits: LimitsConfig) -> None:
    if body.get("max_tokens") is None:  # Anthropic's API requires it; OpenAI's default it
        raise _bad("max_tokens", "field required")
    _check_anthropic(body, limits)


_SHAPES: Mapping[str, Callable[[dict[str, Any], LimitsConfig], None]] = MappingProxyType({
    "chat": _check_messages,
    "completion": _check_prompt,
    "responses": _check_responses,
    "messages": _check_messages_api,
    "count_tokens": _check_anthropic,
    "embeddings": _check_embeddings,
})


def check_params(endpoint: str, body: dict[str, Any], limits: LimitsConfig) -> None:
    """400 naming every top-level field that is denied, or unknown (when `strict_params`)."""
    names = set(body)
    denied = sorted(names & set(limits.denied_params))
    if denied:
        raise _bad(denied[0], f"not accepted by this server: {', '.join(denied)}")
    if limits.strict_params:
        unknown = sorted(names - allowed_params(endpoint, limits))
        if unknown:
            raise _bad(unknown[0], f"unknown parameter(s): {', '.join(unknown)}", code="unknown_parameter")


def check_request(
    endpoint: str, body: dict[str, Any], tier_cap: int | None, limits: LimitsConfig | None = None
) -> None:
    """Check a parsed request body for `endpoint` (one of `ENDPOINTS`); APIError 400 naming the field.

    `tier_cap` is the resolved tier's `tier_max_tokens(...)` (None: not checked, e.g. before routing). Checks
    the shapes this module and the router rely on; the rest of the typing is vLLM's (a 400 from the tier, never
    a 500).
    """
    limits = limits if limits is not None else LimitsConfig()
    if endpoint not in ENDPOINTS:
        raise APIError(404, f"unknown endpoint {endpoint!r}")
    check_params(endpoint, body, limits)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad("stream", "must be a boolean")
    if endpoint in ("chat", "completion"):
        _check_int(body, "n", 1, limits.max_n, "this server's limit")
    check_max_tokens(endpoint, body, tier_cap)
    _SHAPES[endpoint](body, limits)


MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")  # chat's and completion's
# Each endpoint's output-token fields, and their lowest value: a completion may ask 0 tokens (echo + prompt
# logprobs scoring). count_tokens and embeddings generate nothing.
OUTPUT_TOKEN_FIELDS: Mapping[str, tuple[tuple[str, ...], int]] = MappingProxyType({
    "chat": (MAX_TOKENS_FIELDS, 1),
    "completion": (MAX_TOKENS_FIELDS, 0),
    "responses": (("max_output_tokens",), 1),
    "messages": (("max_tokens",), 1),
    "count_tokens": ((), 1),
    "embeddings": ((), 1),
})


def check_max_tokens(endpoint: str, body: dict[str, Any], tier_cap: int | None) -> None:
    """The endpoint's output-token fields: integers, within the resolved tier's cap (None: only the type)."""
    names, low = OUTPUT_TOKEN_FIELDS.get(endpoint, OUTPUT_TOKEN_FIELDS["chat"])
    for name in names:
        _check_int(body, name, low, tier_cap if tier_cap is not None else _INT64_MAX, "this model's cap")


def check_tier_cap(body: dict[str, Any], tier_cap: int, endpoint: str = "chat") -> None:
    """The resolved tier's cap on `endpoint`'s output-token fields, on a body whose types `check_request` already
    checked."""
    names, _ = OUTPUT_TOKEN_FIELDS.get(endpoint, OUTPUT_TOKEN_FIELDS["chat"])
    for name in names:
        value = body.get(name)
        if _is_int(value) and value > tier_cap:
            raise _bad(name, f"{value} is greater than this model's cap of {tier_cap}", code="integer_above_max_value")
