"""Input limits: what the ingress checks before a request reaches a tier. Pure; raises APIError 400/408/413.

Body size (413, while reading, before JSON parsing), slow uploads (408), then per field: messages (or input
items) per request, characters per message, tools per request, `n`, the output-token field against the tier's
cap, and a strict parameter check: a top-level field that neither the public API (OpenAI's, or Anthropic's for
/v1/messages) nor vLLM's request models know is a 400 naming it, instead of being silently ignored (vLLM's models
accept and drop extras).

The vLLM half of the allow-list is computed at import from vLLM's own pydantic request models, without
importing vLLM (its import takes seconds and loads torch; the ingress never imports it): the models' source is
located with `importlib.util.find_spec("vllm")` and its annotated class fields are read with `ast`, following
base classes into the vLLM modules they are imported from. When vLLM is already imported (a tier replica,
tests) the live `model_fields` are used instead; when it is not installed or its layout moved, a static snapshot
taken from vLLM 0.32.0 is the fallback. `PARAMS_SOURCE` says which was used.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.util
import sys
from collections.abc import AsyncIterable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

from serving.config import ENDPOINTS, LimitsConfig, Tier
from serving.wire.errors import APIError

_INT64_MAX = 2**63 - 1

# The public APIs' request fields: OpenAI's (platform.openai.com/docs/api-reference/{chat,completions,responses,
# embeddings}/create) and Anthropic's (docs.anthropic.com/en/api/{messages,messages-count-tokens}). Those vLLM does
# not implement are accepted and ignored by it, as SDKs and agent frameworks send some of them.
API_PARAMS: Mapping[str, frozenset[str]] = MappingProxyType({
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
    "responses": frozenset({
        "model", "input", "instructions", "previous_response_id", "store", "stream", "stream_options", "tools",
        "tool_choice", "parallel_tool_calls", "max_output_tokens", "max_tool_calls", "temperature", "top_p",
        "top_logprobs", "truncation", "metadata", "reasoning", "text", "include", "user", "service_tier",
        "background", "prompt", "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "conversation",
    }),
    "messages": frozenset({
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
        "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers", "context_management",
    }),
    "count_tokens": frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"}),
    "embeddings": frozenset({"input", "model", "dimensions", "encoding_format", "user"}),
})
OPENAI_PARAMS = API_PARAMS  # the name from before Anthropic's endpoints

# vLLM's request models: (module, class names). /v1/embeddings validates with a union of models, so a request may
# carry the fields of any of them.
_VLLM_MODELS: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType({
    "chat": ("vllm.entrypoints.openai.chat_completion.protocol", ("ChatCompletionRequest",)),
    "completion": ("vllm.entrypoints.openai.completion.protocol", ("CompletionRequest",)),
    "responses": ("vllm.entrypoints.openai.responses.protocol", ("ResponsesRequest",)),
    "messages": ("vllm.entrypoints.anthropic.protocol", ("AnthropicMessagesRequest",)),
    "count_tokens": ("vllm.entrypoints.anthropic.protocol", ("AnthropicCountTokensRequest",)),
    "embeddings": ("vllm.entrypoints.pooling.embed.protocol", (
        "EmbeddingCompletionRequest", "EmbeddingChatRequest", "EmbeddingBatchChatRequest",
        "EmbeddingChatInputRequest", "EmbeddingBatchChatInputRequest",
    )),
})
# A sanity floor per endpoint: a layout change that leaves a stub class must not shrink the allow-list to nothing.
_FLOOR: Mapping[str, frozenset[str]] = MappingProxyType({
    "chat": frozenset({"model", "messages", "stream", "max_tokens"}),
    "completion": frozenset({"model", "prompt", "stream", "max_tokens"}),
    "responses": frozenset({"model", "input", "stream", "max_output_tokens"}),
    "messages": frozenset({"model", "messages", "stream", "max_tokens"}),
    "count_tokens": frozenset({"model", "messages"}),
    "embeddings": frozenset({"model", "input"}),
})
_BASE_MODELS = frozenset({"OpenAIBaseModel", "BaseModel", "object"})  # bases that contribute no request fields

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
_ANTHROPIC_COMMON = frozenset({
    "chat_template_kwargs", "messages", "model", "output_config", "system", "thinking", "tool_choice", "tools",
})
VLLM_PARAMS_SNAPSHOT: Mapping[str, frozenset[str]] = MappingProxyType({
    "chat": _VLLM_COMMON | {
        "add_generation_prompt", "chat_template", "chat_template_kwargs", "continue_final_message", "documents",
        "include_reasoning", "max_completion_tokens", "media_io_kwargs", "messages", "mm_processor_kwargs",
        "parallel_tool_calls", "reasoning_effort", "return_prompt_text", "tool_choice", "tools", "top_logprobs",
    },
    "completion": _VLLM_COMMON | {"prompt", "prompt_embeds", "suffix"},
    "responses": frozenset({
        "background", "cache_salt", "chat_template_kwargs", "ec_transfer_params", "enable_response_messages",
        "frequency_penalty", "ignore_eos", "include", "include_reasoning", "include_stop_str_in_output", "input",
        "instructions", "kv_transfer_params", "logit_bias", "max_output_tokens", "max_tool_calls", "media_io_kwargs",
        "metadata", "min_p", "mm_payload", "mm_processor_kwargs", "model", "parallel_tool_calls", "presence_penalty",
        "previous_input_messages", "previous_response_id", "priority", "prompt", "prompt_cache_key", "reasoning",
        "repetition_penalty", "request_id", "return_mm_kwargs", "seed", "service_tier", "session_id",
        "skip_special_tokens", "stop", "stop_token_ids", "store", "stream", "structured_outputs", "temperature",
        "text", "tool_choice", "tools", "top_k", "top_logprobs", "top_p", "truncation", "user", "vllm_xargs",
        "watermarking",
    }),
    "messages": _ANTHROPIC_COMMON | {
        "cache_salt", "ec_transfer_params", "kv_transfer_params", "max_tokens", "metadata", "mm_payload",
        "return_mm_kwargs", "stop_sequences", "stream", "temperature", "top_k", "top_p", "vllm_xargs", "watermarking",
    },
    "count_tokens": _ANTHROPIC_COMMON,
    "embeddings": frozenset({
        "add_generation_prompt", "add_special_tokens", "cache_salt", "chat_template", "chat_template_kwargs",
        "continue_final_message", "dimensions", "embed_dtype", "encoding_format", "endianness", "input",
        "media_io_kwargs", "messages", "mm_processor_kwargs", "model", "padding", "priority", "request_id",
        "truncate_prompt_tokens", "truncation_side", "use_activation", "user",
    }),
})


def _fields_from_live_model(endpoint: str) -> frozenset[str] | None:
    module_name, class_names = _VLLM_MODELS[endpoint]
    names: set[str] = set()
    for class_name in class_names:
        model = getattr(sys.modules.get(module_name), class_name, None)
        fields = getattr(model, "model_fields", None)
        if not isinstance(fields, dict):
            return None
        names.update(fields)
        names.update(a for f in fields.values() if isinstance(a := getattr(f, "alias", None), str))
    return frozenset(names)


def _class_fields(
    tree: ast.Module,
    class_name: str,
    seen: frozenset[str] = frozenset(),
    imported: Callable[[str], set[str] | None] | None = None,
) -> set[str] | None:
    """Annotated fields of a pydantic class in `tree`, its bases included: those of the module, and imported ones
    when `imported` resolves them (a name -> its fields); None if not resolvable."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    cls = classes.get(class_name)
    if cls is None or class_name in seen:
        return None
    names: set[str] = set()
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name in _BASE_MODELS:
            continue
        inherited: set[str] | None = None
        if base_name in classes:
            inherited = _class_fields(tree, base_name, seen | {class_name}, imported)
        elif base_name is not None and imported is not None:
            inherited = imported(base_name)
        if inherited is None:
            return None  # a base we can't see: we can't see all fields, don't guess
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


@functools.lru_cache(maxsize=64)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return None


class _VllmSource:
    """One installed vLLM's modules, parsed on demand, to follow a class's bases across `from ... import`s."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _module(self, module: str) -> tuple[ast.Module, dict[str, tuple[str, str]]] | None:
        """(tree, imported name -> (module, name)) of a module of the vllm package."""
        parts = module.split(".")
        if parts[0] != "vllm":
            return None  # pydantic's, openai's...: not followed, so a base from there is unresolvable
        base = self.root.joinpath(*parts[1:])
        for path, package in ((base.parent / f"{base.name}.py", False), (base / "__init__.py", True)):
            tree = _parse(path) if len(parts) > 1 or package else None  # "vllm" itself is only a package
            if tree is None:
                continue
            here = parts if package else parts[:-1]  # the package that relative imports start from
            imports: dict[str, tuple[str, str]] = {}
            for node in tree.body:
                if not isinstance(node, ast.ImportFrom) or node.level > len(here):
                    continue
                origin = here[: len(here) - node.level + 1] if node.level else []
                source = ".".join([*origin, *([node.module] if node.module else [])])
                imports.update({a.asname or a.name: (source, a.name) for a in node.names})
            return tree, imports
        return None

    def class_fields(self, module: str, class_name: str, seen: frozenset[str] = frozenset()) -> set[str] | None:
        key = f"{module}:{class_name}"
        loaded = self._module(module) if key not in seen else None
        if loaded is None:
            return None
        tree, imports = loaded
        seen = seen | {key}

        def imported(name: str) -> set[str] | None:
            return self.class_fields(*imports[name], seen) if name in imports else None

        if not any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
            return imported(class_name)  # re-exported from another module
        return _class_fields(tree, class_name, imported=imported)


def _fields_from_source(endpoint: str) -> frozenset[str] | None:
    module, class_names = _VLLM_MODELS[endpoint]
    try:
        spec = importlib.util.find_spec("vllm")  # a top-level spec is found without importing the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        source = _VllmSource(Path(root))
        names: set[str] = set()
        for class_name in class_names:
            fields = source.class_fields(module, class_name)
            if fields is None:
                break
            names |= fields
        else:
            if _FLOOR[endpoint] <= names:
                return frozenset(names)
    return None


def vllm_params(endpoint: str) -> tuple[frozenset[str], str]:
    """(field names of vLLM's request model(s) for `endpoint`, where they came from)."""
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
        known[endpoint] = API_PARAMS[endpoint] | names
    _parse.cache_clear()  # the trees are only needed once
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
