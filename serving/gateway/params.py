"""The request fields each endpoint accepts: a top-level field that neither the public API (OpenAI's, or
Anthropic's for /v1/messages) nor vLLM's request models know is refused by `limits.check_params`, instead of
being silently ignored (vLLM's models accept and drop extras).

The vLLM half of the allow-list is computed at import from vLLM's own pydantic request models, without
importing vLLM (its import takes seconds and loads torch; the ingress never imports it): the models' source is
located with `importlib.util.find_spec("vllm")` and its annotated class fields are read with `ast`, following
base classes into the vLLM modules they are imported from. When vLLM is already imported (a tier replica,
tests) the live `model_fields` are used instead; when it is not installed or its layout moved, a static snapshot
taken from vLLM 0.32.0 is the fallback. `PARAMS_SOURCE` says which was used.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from serving.config import ENDPOINTS, LimitsConfig

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
