"""The tier deployment: each replica owns one vLLM AsyncLLM engine in-process.

vLLM's own OpenAI serving classes do the chat templating, sampling-parameter conversion and response /
chunk types; this module only adapts them to the backend interface (serving/wire/backend.py): a `Call` in,
either one `Result` or a stream of SSE bytes and a closing `Usage` out, every error in our one envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.responses import Response as StarletteResponse

from serving.backends.affinity import colocate_engine_cores
from serving.config import PROMPT_FIELD, Tier
from serving.ops.metrics import engine_metrics_text, engine_waiting
from serving.ops.tracing import Tracing
from serving.wire.errors import ENGINE_DEAD, APIError, from_validation_errors, from_vllm_error, protocol_of, render_sse
from serving.wire.items import Call, ReplicaPick, Result, StreamItem, Usage
from serving.wire.sse import DONE_TEXT, is_error_event, with_usage

log = logging.getLogger(__name__)

USAGE_CHUNK_PREFIX = 'data: {"id":'  # vLLM's chunks; the usage-only one has `"choices":[]`
# The OpenAI endpoints whose streams carry usage only when `stream_options.include_usage` asks for it.
USAGE_OPTION_ENDPOINTS = frozenset({"chat", "completion"})
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


def engine_args(tier: Tier, model_path: Path) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    e = tier.engine
    return AsyncEngineArgs(
        model=str(model_path),
        served_model_name=[tier.served_name],
        max_model_len=e.max_model_len,
        dtype=e.dtype,
        quantization=e.quantization,
        gpu_memory_utilization=e.gpu_memory_utilization,
        tensor_parallel_size=e.tensor_parallel_size,
        max_num_seqs=e.max_num_seqs,
        scheduling_policy=e.scheduling_policy,
        enforce_eager=e.enforce_eager,
        seed=e.seed,
        # Worker processes, not Ray actors: the replica's own actor already holds the tier's resources.
        distributed_executor_backend="mp",
        disable_log_stats=False,
        # The engine's grammar must know where the thinking ends, as the serving classes do.
        reasoning_parser=tier.reasoning_parser or "",
        **_task_args(tier),
        **e.extra,
    )


def _task_args(tier: Tier) -> dict[str, Any]:
    return {"runner": "pooling"} if tier.task == "embed" else {}  # an embedding model: vLLM's pooling runner


# The priority of the request being submitted, for the Anthropic Messages route: vLLM converts that request to a
# chat request inside its serving class, and the Anthropic request type has no `priority` field to carry it.
_MESSAGES_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("tierserve_messages_priority", default=0)


def engine_priority(tier: Tier, priority: int) -> int:
    """What the engine gets: the key's priority, or 0 on an `fcfs` tier (vLLM documents a non-zero priority as
    an error without priority scheduling; 0.32 ignores it, a later release may fail the request)."""
    return priority if tier.engine.scheduling_policy == "priority" else 0


def with_engine_fields(request: Any, priority: int, cache_salt: str | None = None) -> Any:
    """`request` (a validated vLLM request) with vLLM's `priority` and `cache_salt` set, where its type has
    those fields (the client's own salt was dropped at admission; None shares the prefix cache)."""
    fields = getattr(type(request), "model_fields", {})
    if "priority" in fields:
        request.priority = priority
    if "cache_salt" in fields:
        request.cache_salt = cache_salt
    return request


@dataclass(frozen=True, slots=True)
class Route:
    """How one endpoint reaches vLLM's serving code: the request model that validates the body, the handler."""

    request_type: Any  # a pydantic model class, or a TypeAdapter for a union (embeddings)
    handle: Callable[[Any], Awaitable[Any]]

    def validate(self, body: dict[str, Any]) -> Any:
        if isinstance(self.request_type, type) and issubclass(self.request_type, BaseModel):
            return self.request_type.model_validate(body)
        return self.request_type.validate_python(body)


class TierServer:
    """Plain class; `serving.app` wraps it with `serve.deployment` and the tier's options."""

    def __init__(self, tier_name: str, tier: Tier, cache_dir: str) -> None:
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.v1.engine.async_llm import AsyncLLM

        from serving.backends.weights import resolve
        from serving.security.redaction import redact_replica_logs

        redact_replica_logs()  # provider or agent keys in an engine error's text never reach the log
        self.tier_name = tier_name
        self.tier = tier
        self.tracing = Tracing(f"tierserve-tier-{tier_name}")
        os.environ.update(tier.resources.env)
        model_path = resolve(tier.model, Path(cache_dir), embedding=tier.task == "embed")
        log.info("tier %s: starting engine for %s", tier_name, model_path)
        self.engine: Any = AsyncLLM.from_engine_args(engine_args(tier, model_path))  # None once shut down
        if tier.resources.colocate_engine_core and tier.resources.gpus == 0:
            for pid, cpus in colocate_engine_cores().items():
                log.info("tier %s: engine core %d runs on its worker's CPUs %s", tier_name, pid, sorted(cpus))
        models = OpenAIServingModels(
            engine_client=self.engine,
            base_model_paths=[BaseModelPath(name=tier.served_name, model_path=str(model_path))],
        )
        if tier.task == "embed":
            self.routes = _embedding_routes(self.engine, models)
        else:
            self.routes = _generate_routes(self.engine, models, tier)
        self.replica_id = _replica_id()
        self.gpus: Any = None  # GpuCollector, made on first use (NVML init once per replica)

    # -- request path -------------------------------------------------------------------------------

    async def _start(self, call: Call, body: dict[str, Any]) -> Any:
        endpoint = call.endpoint
        try:
            return await self._submit(call, body)
        except Exception as exc:
            # Nothing escapes a tier call as an exception: what vLLM raises instead of returning an
            # ErrorResponse goes through vLLM's own mapping (client errors 4xx, the rest 5xx).
            error = exc if isinstance(exc, APIError) else self._map_exception(exc)
            if error.code == "context_length_exceeded":
                # vLLM says `input_tokens`; OpenAI names the field the client sent.
                error.param = PROMPT_FIELD.get(endpoint, "messages")
            if error is exc:
                raise
            raise error from exc

    async def _submit(self, call: Call, body: dict[str, Any]) -> Any:
        """Validate with vLLM's protocol types and hand the request to vLLM's serving code, at the caller's
        priority (the key's class: the body's `priority` never gets this far) and with the caller's
        prefix-cache salt (the key's cache scope)."""
        endpoint = call.endpoint
        route = self.routes.get(endpoint)
        if route is None:
            raise APIError(404, f"tier {self.tier_name} ({self.tier.task} model) does not serve {endpoint}",
                           code="unsupported_endpoint")
        body = {**body, "model": self.tier.served_name}
        self._check_tools(endpoint, body)
        try:
            request = route.validate(body)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors()) from None
        except Exception as exc:
            # Some of vLLM's validators crash on a wrong type instead of reporting it (e.g. AttributeError for
            # `structured_outputs: true`): still the request's fault, so a 400, naming the field if one is.
            param = _culprit(route, body)
            where = f"{param}: " if param else ""
            raise APIError(400, f"{where}invalid value ({type(exc).__name__}: {exc})", param=param) from None
        if self._dead():
            raise self._dead_error()
        priority = engine_priority(self.tier, call.priority)
        with_engine_fields(request, priority, call.cache_salt)
        token = _MESSAGES_PRIORITY.set(priority)  # the Anthropic request has no field: its conversion reads this
        try:
            with self.tracing.span("tierserve.engine", model=self.tier.served_name):
                result = await route.handle(request)
        finally:
            _MESSAGES_PRIORITY.reset(token)
        error = getattr(result, "error", None)
        if error is not None and hasattr(error, "model_dump"):
            raise from_vllm_error(error.model_dump())
        if isinstance(result, StarletteResponse) and result.status_code >= 400:  # a pooling handler's error
            raise from_vllm_error(orjson.loads(bytes(result.body)).get("error") or {"code": result.status_code})
        return result

    def _check_tools(self, endpoint: str, body: dict[str, Any]) -> None:
        """Calling tools needs the tier's tool-call parser: say which setting, not vLLM's CLI flags."""
        if self.tier.tool_call_parser is not None or not body.get("tools"):
            return
        choice = body.get("tool_choice")
        if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
            return  # tools listed but never called: the template renders them, nothing is parsed
        raise APIError(
            400,
            f"tool_choice: calling tools (tool_choice {'auto' if choice is None else choice!r}; \"auto\" is the "
            f"default when tools are given) needs a tool-call parser, and tier {self.tier_name} has none: set "
            f"tiers.{self.tier_name}.tool_call_parser in models.yaml, or send tool_choice \"none\"",
            param="tool_choice", code="tool_choice_unsupported")

    def _dead(self) -> bool:
        return self.engine is None or bool(self.engine.errored)

    def _dead_error(self) -> APIError:
        return APIError(503, f"tier {self.tier_name}: engine is dead, replica restarting", code=ENGINE_DEAD)

    def _dead_or(self, error: APIError) -> APIError:
        """A server-side failure of an engine that has died is the engine's death (what ejects the tier)."""
        return self._dead_error() if error.status >= 500 and self._dead() else error

    def _map_exception(self, exc: Exception) -> APIError:
        """vLLM's own exception -> status mapping (validation 400, not found 404, engine 5xx)."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        error = create_error_response(exc).error.model_dump()
        if int(error.get("code") or 500) >= 500:
            log.exception("tier %s: engine failure", self.tier_name, exc_info=exc)
            error["message"] = f"tier {self.tier_name}: engine failure: {error.get('message')}"
        return from_vllm_error(error)

    async def complete(self, call: Call) -> Result:
        with self.tracing.span("tierserve.tier", parent=call.trace, tier=self.tier_name, endpoint=call.endpoint):
            result = await self._complete(call)
        result.replica = self.replica_id
        return result

    async def _complete(self, call: Call) -> Result:
        endpoint = call.endpoint
        try:
            result = await self._start(call, call.body)
        except APIError as exc:
            return Result.error(exc)
        if isinstance(result, StarletteResponse):  # the pooling handlers answer with a ready response
            data = bytes(result.body)
            return Result(200, data, _usage_of(endpoint, orjson.loads(data).get("usage")))
        if not hasattr(result, "model_dump"):  # a generator: the body asked for stream=true
            return Result.error(APIError(400, "stream=true must use the streaming path", param="stream"))
        if endpoint == "responses":
            dumped = result.model_dump(mode="json", by_alias=True)  # as vLLM's own route writes it
        else:
            dumped = result.model_dump(exclude_none=True)
        # NON_STR_KEYS: `prompt_logprobs` are keyed by token id; JSON writes those keys as strings (as vLLM does).
        data = orjson.dumps(dumped, option=orjson.OPT_NON_STR_KEYS)
        return Result(200, data, _usage_of(endpoint, dumped.get("usage")))

    async def stream(self, call: Call, coalesce: bool = True) -> AsyncIterator[StreamItem]:
        """Yield an error Result alone, or SSE bytes, then a Usage, then `[DONE]`. `coalesce` (the Ray path)
        sends the chunks already produced together, so a busy engine costs fewer Ray object transfers without
        delaying any token; an embedded tier (LocalTier) passes each chunk straight on, with no task hop."""
        endpoint = call.endpoint
        with self.tracing.span("tierserve.tier", parent=call.trace, tier=self.tier_name, endpoint=endpoint,
                               stream=True):
            body, client_wants_usage = call.body, True
            if endpoint in USAGE_OPTION_ENDPOINTS:
                body, client_wants_usage = with_usage(body)
            try:
                result = await self._start(call, body)
            except APIError as exc:
                yield Result.error(exc)
                return
            if hasattr(result, "model_dump"):
                yield Result.error(APIError(400, "stream=false must use the non-streaming path", param="stream"))
                return
            items = self._items(endpoint, result, client_wants_usage)
            if coalesce:
                items = _coalesced(items)
            async with contextlib.aclosing(items):  # closed now, not when collected: aborts in the engine
                async for item in items:
                    yield item

    async def _items(
        self, endpoint: str, result: AsyncGenerator[Any, None], client_wants_usage: bool
    ) -> AsyncGenerator[StreamItem, None]:
        """vLLM's SSE events as bytes, with the usage as a Usage item after the data and before the closing event
        (`[DONE]`, Anthropic's `message_stop`, the Responses API's `response.completed`): a client hangs up on
        that, and anything still owed after it turns a finished response into a cancelled one. Closing this
        generator closes vLLM's, which aborts the request in the engine."""
        usage: Usage | None = None
        closing: list[str] = []
        started = False
        try:
            async with contextlib.aclosing(result):  # our close reaches vLLM's generator at once
                async for item in result:
                    event = _event_text(item)
                    if not started and is_error_event(event):
                        # Failed before its first token (an engine that died under a request it had just
                        # accepted): nothing has started, so the dispatcher may send it elsewhere.
                        yield Result.error(self._dead_or(_error_of_event(event)))
                        return
                    started = True
                    found, terminal = _scan(endpoint, event)
                    if found is not None:
                        usage = found
                        if endpoint in USAGE_OPTION_ENDPOINTS and not client_wants_usage:
                            continue  # the usage-only chunk tierserve asked for
                    if terminal:
                        closing.append(event)  # held until the usage has gone
                        continue
                    yield _translate_sse(event) if endpoint in USAGE_OPTION_ENDPOINTS else event.encode()
        except Exception as exc:
            error = self._dead_or(self._map_exception(exc))
            if not started:  # nothing sent yet: the dispatcher may send it elsewhere
                yield Result.error(error)
                return
            yield render_sse(error, protocol_of(endpoint))  # in-stream, in the stream's own protocol
        if usage is not None:
            yield usage
        for event in closing:
            yield event.encode()

    # -- health and telemetry -----------------------------------------------------------------------

    async def probe(self) -> float:
        """One token (an embedding tier: one embedding) straight through the engine: proof of life that
        /health/ready can trust."""
        from vllm import SamplingParams

        if self.engine is None:
            raise RuntimeError(f"tier {self.tier_name}: engine stopped")
        start = time.perf_counter()
        request_id = f"probe-{uuid.uuid4().hex}"
        if self.tier.task == "embed":  # a pooling engine does not generate: one embedding is its proof
            from vllm import PoolingParams

            stream = self.engine.encode({"prompt": "ok"}, PoolingParams(task="embed"), request_id=request_id)
        else:
            stream = self.engine.generate({"prompt": "ok"}, SamplingParams(max_tokens=1, temperature=0),
                                          request_id=request_id)
        async for _ in stream:
            pass
        return time.perf_counter() - start

    def engine_metrics(self, pick: ReplicaPick | None = None) -> tuple[str, str]:
        """(replica id, vLLM's own metrics of this replica's engine as exposition text); `pick` only routed
        the call here."""
        from prometheus_client import REGISTRY

        return self.replica_id, engine_metrics_text(REGISTRY)

    def waiting(self, pick: ReplicaPick | None = None) -> tuple[str, int]:
        """(replica id, requests queued in this replica's engine): what the router reads every few seconds."""
        from prometheus_client import REGISTRY

        return self.replica_id, engine_waiting(REGISTRY)

    def gpu_snapshot(self) -> dict[str, Any]:
        """This node's GPUs, with the memory held by this replica's engine processes labelled as the tier."""
        if self.gpus is None:
            from serving.ops.gpu import GpuCollector

            self.gpus = GpuCollector(tier_of={os.getpid(): self.tier_name})
        return self.gpus.snapshot().to_dict()

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        await self.engine.check_health()

    def running(self) -> int:
        """Replicas of this tier that this process can call: itself, unless its engine died."""
        return 0 if self._dead() else 1

    def shutdown(self) -> None:
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()  # the last spans leave before the replica does
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            try:
                engine.shutdown()
            finally:
                reap_children()

    def __del__(self) -> None:
        # Ray Serve calls __del__ on graceful replica shutdown (downscale, redeploy, stop): the engine's
        # processes must go with the replica, or each scale-down leaks a worker holding GPU memory.
        self.shutdown()


def reap_children(grace_s: float = 5.0) -> None:
    """Terminate, then kill, whatever processes this replica started and left behind."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (direct use in tests or scripts)
        return str(os.getpid())


def _culprit(route: Route, body: dict[str, Any]) -> str | None:
    """The top-level field without which `body` validates (error path only: one validation per field)."""
    for name in body:
        if name in ("model", "messages", "prompt", "input"):
            continue
        try:
            route.validate({k: v for k, v in body.items() if k != name})
        except Exception:
            continue
        return name
    return None


async def _coalesced(items: AsyncIterator[StreamItem]) -> AsyncGenerator[StreamItem, None]:
    """The same items, with SSE bytes already waiting joined into one: a pump task reads ahead into a queue."""
    queue: asyncio.Queue[StreamItem | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            parts = [await queue.get()]
            while not queue.empty():
                parts.append(queue.get_nowait())
            data = b""
            for part in parts:
                if isinstance(part, bytes):
                    data += part
                    continue
                if data:
                    yield data
                    data = b""
                if part is None:
                    return
                yield part
            if data:
                yield data
    finally:
        task.cancel()  # the consumer went away (or we finished): cancelling the pump aborts the engine request


def _translate_sse(chunk: str) -> bytes:
    """vLLM writes in-stream errors with an int `code`; rewrite those into our envelope."""
    if is_error_event(chunk):
        try:
            error = orjson.loads(chunk[6:].strip())["error"]
            return from_vllm_error(error).sse()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    return chunk.encode()


def _error_of_event(event: str) -> APIError:
    """An in-stream error event of any protocol as an APIError (vLLM's int `code` is its HTTP status)."""
    try:
        data = orjson.loads(_data_of(event) if event.startswith("event:") else event[6:].strip())
        error = data["error"] if isinstance(data.get("error"), dict) else data
        return from_vllm_error({"code": error.get("code"), "message": error.get("message")})
    except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError):
        return APIError(500, "engine error before the first token")


def _event_text(item: Any) -> str:
    """vLLM's chat, completion and Messages streams yield SSE text; its Responses stream yields event objects,
    written here the way vLLM's own route writes them."""
    if isinstance(item, str):
        return item
    return f"event: {item.type}\ndata: {item.model_dump_json(indent=None, by_alias=True)}\n\n"


def _scan(endpoint: str, event: str) -> tuple[Usage | None, bool]:
    """(the usage an event carries, whether it closes the stream). Only the few events that can carry usage
    are parsed."""
    if endpoint in USAGE_OPTION_ENDPOINTS:
        if event == DONE_TEXT:
            return None, True
        if event.startswith(USAGE_CHUNK_PREFIX) and '"choices":[]' in event:
            return _usage_of(endpoint, orjson.loads(event[6:])["usage"]), False
        return None, False
    if endpoint == "messages":
        if event.startswith("event: message_stop"):
            return None, True
        if event.startswith("event: message_delta"):
            return _usage_of(endpoint, orjson.loads(_data_of(event)).get("usage")), False
        return None, False
    if endpoint == "responses" and event.startswith("event: response."):
        kind = event[7:event.index("\n")]
        if kind in _RESPONSES_END:
            return _usage_of(endpoint, orjson.loads(_data_of(event))["response"].get("usage")), True
    return None, False


def _data_of(event: str) -> str:
    return event[event.index("\ndata: ") + 7:]


def _usage_of(endpoint: str, usage: Any) -> Usage:
    """Token counts from a response's `usage`, in each API's own field names."""
    if not isinstance(usage, dict):
        return Usage()
    if endpoint in ("responses", "messages"):
        return Usage(usage.get("input_tokens") or 0, usage.get("output_tokens") or 0)
    if endpoint == "count_tokens":
        return Usage()  # counting is not generating: nothing to charge
    return Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)


def _generate_routes(engine: Any, models: Any, tier: Tier) -> dict[str, Route]:
    """vLLM's serving classes for a generating model, configured as `vllm serve` would be with this tier's
    tool-call parser, reasoning parser and chat template."""
    from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.online_renderer import OnlineRenderer

    template = load_chat_template(tier.chat_template) if tier.chat_template else None
    # The renderer checks tool_choice and parses tool calls and reasoning: it gets the parsers as well.
    parsers: dict[str, Any] = {
        "enable_auto_tools": tier.tool_call_parser is not None,
        "tool_parser": tier.tool_call_parser,
        "reasoning_parser": tier.reasoning_parser or "",
        "tool_strict_level": tier.tool_strict_level,
    }
    templating: dict[str, Any] = {"request_logger": None, "chat_template": template,
                                  "chat_template_content_format": "auto"}
    renderer = OnlineRenderer(model_config=engine.model_config, renderer=engine.renderer, **templating,
                              **parsers)
    renderer.warmup()
    chat_like: dict[str, Any] = {"online_renderer": renderer, **templating, **parsers}
    chat = OpenAIServingChat(engine, models, "assistant", **chat_like)
    completion = OpenAIServingCompletion(engine, models, online_renderer=renderer, request_logger=None)
    # The gateway keeps stored responses itself (per key, across replicas): vLLM's store stays off.
    responses = OpenAIServingResponses(engine, models, **chat_like)
    messages = _prioritized_messages(AnthropicServingMessages)(engine, models, "assistant", **chat_like)
    return {
        "chat": Route(ChatCompletionRequest, lambda r: chat.create_chat_completion(r, None)),
        "completion": Route(CompletionRequest, lambda r: completion.create_completion(r, None)),
        "responses": Route(ResponsesRequest, lambda r: responses.create_responses(r, None)),
        "messages": Route(AnthropicMessagesRequest, lambda r: messages.create_messages(r, None)),
        "count_tokens": Route(AnthropicCountTokensRequest, lambda r: messages.count_tokens(r, None)),
    }


def _prioritized_messages(base: Any) -> Any:
    """vLLM's Anthropic Messages class, its chat request given the priority of the request being submitted
    (and the salt tierserve set on the Anthropic request)."""

    class PrioritizedMessages(base):
        @classmethod
        def to_chat_completion_request(cls, anthropic_request: Any, **kwargs: Any) -> Any:
            chat = super().to_chat_completion_request(anthropic_request, **kwargs)
            return with_engine_fields(chat, _MESSAGES_PRIORITY.get(), anthropic_request.cache_salt)

    return PrioritizedMessages


def _embedding_routes(engine: Any, models: Any) -> dict[str, Route]:
    from pydantic import TypeAdapter
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
    from vllm.renderers.chat_utils import ChatTemplateConfig

    embedding = ServingEmbedding(engine, models, request_logger=None, chat_template_config=ChatTemplateConfig())
    return {"embeddings": Route(TypeAdapter(EmbeddingRequest), lambda r: embedding(r, None))}
