"""Input limits: what the ingress checks before a request reaches a tier. Pure; raises APIError 400/408/413.

Body size (413, while reading, before JSON parsing), slow uploads (408), then per field: messages per request,
characters per message, `n`, `max_tokens` against the tier's cap, and a strict parameter check: a top-level
field that neither OpenAI's API nor vLLM's request models know is a 400 naming it, instead of being silently
ignored (vLLM's models accept and drop extras).

The vLLM half of the allow-list is computed at import from vLLM's own pydantic request models, without
importing vLLM (its import takes seconds and loads torch; the ingress never imports it): the models' source is
located with `importlib.util.find_spec("vllm")` and its annotated class fields are read with `ast`. When vLLM is
already imported (a tier replica, tests) the live `model_fields` are used instead; when it is not installed or
its layout moved, a static snapshot taken from vLLM 0.32.0 is the fallback. `PARAMS_SOURCE` says which was used.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from serving.config import ENDPOINTS, LimitsConfig, Tier
from serving.wire.errors import APIError

_INT64_MAX = 2**63 - 1

# The OpenAI API's request fields (platform.openai.com/docs/api-reference/{chat,completions}/create); those vLLM
# does not implement are accepted and ignored by it, as OpenAI SDKs and agent frameworks send some of them.
OPENAI_PARAMS: Mapping[str, frozenset[str]] = MappingProxyType({
    "chat": frozenset({
        "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
        "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    }),
    "completion": frozenset({
        "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
        "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    }),
})

# vLLM's request models: (path under the vllm package, module name, class name).
_VLLM_MODELS = {
    "chat": ("entrypoints/openai/chat_completion/protocol.py", "vllm.entrypoints.openai.chat_completion.protocol",
             "ChatCompletionRequest"),
    "completion": ("entrypoints/openai/completion/protocol.py", "vllm.entrypoints.openai.completion.protocol",
                   "CompletionRequest"),
}
_BASE_MODELS = frozenset({"OpenAIBaseModel", "BaseModel"})  # bases that contribute no request fields

# Fallback: the fields of those models in vLLM 0.32.0 (tests/unit/test_limits.py checks it against vLLM).
_VLLM_COMMON = frozenset({
    "add_special_tokens", "allowed_token_ids", "bad_words", "cache_salt", "ec_transfer_params", "echo",
    "frequency_penalty", "ignore_eos", "include_stop_str_in_output", "kv_transfer_params", "length_penalty",
    "logit_bias", "logprob_token_ids", "logprobs", "max_tokens", "min_p", "min_tokens", "mm_payload", "model", "n",
    "presence_penalty", "priority", "prompt_logprobs", "repetition_detection", "repetition_penalty", "request_id",
    "response_format", "return_mm_kwargs", "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids",
    "routed_experts_prompt_start", "seed", "session_id", "skip_special_tokens", "spaces_between_special_tokens",
    "stop", "stop_token_ids", "stream", "stream_interval", "stream_options", "structured_outputs", "temperature",
    "thinking_token_budget", "top_k", "top_p", "truncate_prompt_tokens", "truncation_side", "use_beam_search", "user",
    "vllm_xargs", "watermarking",
})
VLLM_PARAMS_SNAPSHOT: Mapping[str, frozenset[str]] = MappingProxyType({
    "chat": _VLLM_COMMON | {
        "add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message", "documents",
        "include_reasoning", "max_completion_tokens", "media_io_kwargs", "messages", "mm_processor_kwargs",
        "parallel_tool_calls", "reasoning_effort", "return_prompt_text", "tool_choice", "tools", "top_logprobs",
    },
    "completion": _VLLM_COMMON | {"prompt", "prompt_embeds", "suffix"},
})


def _fields_from_live_model(endpoint: str) -> frozenset[str] | None:
    _, module_name, class_name = _VLLM_MODELS[endpoint]
    model = getattr(sys.modules.get(module_name), class_name, None)
    fields = getattr(model, "model_fields", None)
    if not isinstance(fields, dict):
        return None
    names = set(fields)
    names.update(a for f in fields.values() if isinstance(a := getattr(f, "alias", None), str))
    return frozenset(names)


def _class_fields(tree: ast.Module, class_name: str, seen: frozenset[str] = frozenset()) -> set[str] | None:
    """Annotated fields of a pydantic class in `tree`, its in-module bases included; None if not resolvable."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    cls = classes.get(class_name)
    if cls is None or class_name in seen:
        return None
    names: set[str] = set()
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name in _BASE_MODELS:
            continue
        inherited = _class_fields(tree, base_name, seen | {class_name}) if base_name else None
        if inherited is None:
            return None  # a base from another module: we can't see all fields, don't guess
        names |= inherited
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(stmt.annotation) or stmt.target.id.startswith("_"):
            continue
        names.add(stmt.target.id)
        if isinstance(stmt.value, ast.Call):  # Field(alias="...") makes the alias a request key too
            for kw in stmt.value.keywords:
                if kw.arg == "alias" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    names.add(kw.value.value)
    return names


def _fields_from_source(endpoint: str) -> frozenset[str] | None:
    relative, _, class_name = _VLLM_MODELS[endpoint]
    try:
        spec = importlib.util.find_spec("vllm")  # a top-level spec is found without importing the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        source = Path(root) / relative
        try:
            tree = ast.parse(source.read_text(), str(source))
        except (OSError, SyntaxError, ValueError):
            continue
        names = _class_fields(tree, class_name)
        # A sanity floor: a layout change that leaves a stub class must not shrink the allow-list to nothing.
        if names and {"model", "stream", "max_tokens"} <= names:
            return frozenset(names)
    return None


def vllm_params(endpoint: str) -> tuple[frozenset[str], str]:
    """(field names of vLLM's request model for `endpoint`, where they came from)."""
    live = _fields_from_live_model(endpoint)
    if live:
        return live, "vllm-model"
    parsed = _fields_from_source(endpoint)
    if parsed:
        return parsed, "vllm-source"
    return VLLM_PARAMS_SNAPSHOT[endpoint], "static"


def _known_params() -> tuple[Mapping[str, frozenset[str]], Mapping[str, str]]:
    known: dict[str, frozenset[str]] = {}
    source: dict[str, str] = {}
    for endpoint in ENDPOINTS:
        names, source[endpoint] = vllm_params(endpoint)
        known[endpoint] = OPENAI_PARAMS[endpoint] | names
    return MappingProxyType(known), MappingProxyType(source)


# Computed once at import; immutable.
KNOWN_PARAMS, PARAMS_SOURCE = _known_params()


def allowed_params(endpoint: str, limits: LimitsConfig) -> frozenset[str]:
    """Top-level fields a request to `endpoint` may carry under `limits`."""
    return (KNOWN_PARAMS[endpoint] | frozenset(limits.extra_params)) - frozenset(limits.denied_params)


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


def _is_int(value: Any) -> bool:
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


def _check_messages(body: dict[str, Any], limits: LimitsConfig) -> None:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "field required")
    if not isinstance(messages, list):
        raise _bad("messages", f"must be a list of messages (got {type(messages).__name__})")
    if not messages:
        raise _bad("messages", "must contain at least one message")
    if len(messages) > limits.max_messages:
        raise _bad("messages", f"{len(messages)} messages, more than the limit of {limits.max_messages}",
                   code="array_above_max_length")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"must be an object (got {type(message).__name__})")
        if not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}].role", "must be a string")
        param = f"messages[{i}].content"
        if _text_chars(message.get("content"), param) > limits.max_chars_per_message:
            raise _bad(param, f"longer than {limits.max_chars_per_message} characters", code="string_above_max_length")


def _check_prompt(body: dict[str, Any], limits: LimitsConfig) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "field required")
    if isinstance(prompt, str):
        if len(prompt) > limits.max_chars_per_message:
            raise _bad("prompt", f"longer than {limits.max_chars_per_message} characters",
                       code="string_above_max_length")
        return
    if not isinstance(prompt, list) or not prompt:
        raise _bad("prompt", "must be a string, a list of strings or a list of token ids, not empty")
    if all(_is_int(t) for t in prompt):  # one prompt as token ids
        if len(prompt) > limits.max_chars_per_message:
            raise _bad("prompt", f"more than {limits.max_chars_per_message} tokens", code="array_above_max_length")
        return
    if len(prompt) > limits.max_messages:
        raise _bad("prompt", f"{len(prompt)} prompts, more than the limit of {limits.max_messages}",
                   code="array_above_max_length")
    for i, item in enumerate(prompt):
        ok_tokens = isinstance(item, list) and all(_is_int(t) for t in item)
        if not (isinstance(item, str) or ok_tokens):
            raise _bad(f"prompt[{i}]", "must be a string or a list of token ids")
        if len(item) > limits.max_chars_per_message:
            raise _bad(f"prompt[{i}]", f"longer than {limits.max_chars_per_message} characters",
                       code="string_above_max_length")


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
    """Check a parsed chat (`endpoint="chat"`) or completion request body; APIError 400 naming the field.

    `tier_cap` is the resolved tier's `tier_max_tokens(...)` (None: not checked, e.g. before routing). Checks
    the shapes this module relies on; the rest of the typing is vLLM's (a 400 from the tier, never a 500).
    """
    limits = limits if limits is not None else LimitsConfig()
    if endpoint not in ENDPOINTS:
        raise APIError(404, f"unknown endpoint {endpoint!r}")
    check_params(endpoint, body, limits)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad("stream", "must be a boolean")
    _check_int(body, "n", 1, limits.max_n, "this server's limit")
    check_max_tokens(endpoint, body, tier_cap)
    if endpoint == "chat":
        _check_messages(body, limits)
    else:
        _check_prompt(body, limits)


MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


def check_max_tokens(endpoint: str, body: dict[str, Any], tier_cap: int | None) -> None:
    """`max_tokens` / `max_completion_tokens`: integers, within the resolved tier's cap (None: only the type)."""
    low = 1 if endpoint == "chat" else 0  # a completion may ask 0 tokens (echo + prompt logprobs scoring)
    for name in MAX_TOKENS_FIELDS:
        _check_int(body, name, low, tier_cap if tier_cap is not None else _INT64_MAX, "this model's cap")


def check_tier_cap(body: dict[str, Any], tier_cap: int) -> None:
    """The resolved tier's `max_tokens` cap, on a body whose types `check_request` already checked."""
    for name in MAX_TOKENS_FIELDS:
        value = body.get(name)
        if value is not None and value > tier_cap:
            raise _bad(name, f"{value} is greater than this model's cap of {tier_cap}", code="integer_above_max_value")
