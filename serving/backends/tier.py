"""The tier deployment: each replica owns one vLLM AsyncLLM engine in-process.

vLLM's own OpenAI serving classes do the chat templating, sampling-parameter conversion and response /
chunk types; this module only adapts them to Ray Serve: a request body in, either one JSON body or a
stream of SSE bytes out, every error in our one envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from serving.backends.affinity import colocate_engine_cores
from serving.config import Tier
from serving.ops.metrics import engine_metrics_text, engine_waiting
from serving.ops.tracing import Tracing
from serving.wire.errors import APIError, from_validation_errors, from_vllm_error

log = logging.getLogger(__name__)

ENDPOINTS = ("chat", "completion")
DONE = b"data: [DONE]\n\n"
DONE_TEXT = DONE.decode()
USAGE_CHUNK_PREFIX = 'data: {"id":'  # vLLM's chunks; the usage-only one has `"choices":[]`


class Result:
    """A non-streamed answer: status, the JSON body bytes (serialised once, in the replica), token usage."""

    __slots__ = ("body", "completion_tokens", "cost_usd", "failover", "prompt_tokens", "retry_after", "status")

    def __init__(self, status: int, body: bytes, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.status = status
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost_usd = 0.0
        self.failover = False  # no answer was started: the ingress may try its next candidate
        self.retry_after: str | None = None

    @classmethod
    def error(cls, exc: APIError) -> Result:
        result = cls(exc.status, exc.json())
        result.failover = exc.status >= 500  # the engine failed, not the request: another target may answer
        return result


class Usage:
    """The last item of a stream: its token counts, for metrics and budgets (never sent to the client)."""

    __slots__ = ("completion_tokens", "cost_usd", "prompt_tokens")

    def __init__(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost_usd = 0.0


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
        enforce_eager=e.enforce_eager,
        seed=e.seed,
        # Worker processes, not Ray actors: the replica's own actor already holds the tier's resources.
        distributed_executor_backend="mp",
        disable_log_stats=False,
        **e.extra,
    )


class TierServer:
    """Plain class; `serving.app` wraps it with `serve.deployment` and the tier's options."""

    def __init__(self, tier_name: str, tier: Tier, cache_dir: str) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.v1.engine.async_llm import AsyncLLM

        from serving.backends.weights import resolve
        from serving.security.redaction import redact_replica_logs

        redact_replica_logs()  # provider or agent keys in an engine error's text never reach the log
        self.tier_name = tier_name
        self.tier = tier
        self.tracing = Tracing(f"tierserve-tier-{tier_name}")
        os.environ.update(tier.resources.env)
        model_path = resolve(tier.model, Path(cache_dir))
        log.info("tier %s: starting engine for %s", tier_name, model_path)
        self.engine = AsyncLLM.from_engine_args(engine_args(tier, model_path))
        if tier.resources.colocate_engine_core and tier.resources.gpus == 0:
            for pid, cpus in colocate_engine_cores().items():
                log.info("tier %s: engine core %d runs on its worker's CPUs %s", tier_name, pid, sorted(cpus))
        models = OpenAIServingModels(
            engine_client=self.engine,
            base_model_paths=[BaseModelPath(name=tier.served_name, model_path=str(model_path))],
        )
        renderer = OnlineRenderer(
            model_config=self.engine.model_config,
            renderer=self.engine.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        self.serving = {
            "chat": OpenAIServingChat(
                self.engine,
                models,
                "assistant",
                online_renderer=renderer,
                request_logger=None,
                chat_template=None,
                chat_template_content_format="auto",
            ),
            "completion": OpenAIServingCompletion(
                self.engine, models, online_renderer=renderer, request_logger=None
            ),
        }
        self.request_types = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
        self.replica_id = _replica_id()
        self.gpus: Any = None  # GpuCollector, made on first use (NVML init once per replica)

    # -- request path -------------------------------------------------------------------------------

    async def _start(self, endpoint: str, body: dict[str, Any]) -> Any:
        try:
            return await self._submit(endpoint, body)
        except Exception as exc:
            # Nothing escapes a tier call as an exception: what vLLM raises instead of returning an
            # ErrorResponse goes through vLLM's own mapping (client errors 4xx, the rest 5xx).
            error = exc if isinstance(exc, APIError) else self._map_exception(exc)
            if error.code == "context_length_exceeded":
                # vLLM says `input_tokens`; OpenAI names the field the client sent.
                error.param = "messages" if endpoint == "chat" else "prompt"
            if error is exc:
                raise
            raise error from exc

    async def _submit(self, endpoint: str, body: dict[str, Any]) -> Any:
        """Validate with vLLM's protocol types and hand the request to vLLM's serving code."""
        if endpoint not in ENDPOINTS:
            raise APIError(404, f"unknown endpoint {endpoint!r}")
        body = {**body, "model": self.tier.served_name}
        request_type = self.request_types[endpoint]
        try:
            request = request_type.model_validate(body)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors()) from None
        except Exception as exc:
            # Some of vLLM's validators crash on a wrong type instead of reporting it (e.g. AttributeError for
            # `structured_outputs: true`): still the request's fault, so a 400, naming the field if one is.
            param = _culprit(request_type, body)
            where = f"{param}: " if param else ""
            raise APIError(400, f"{where}invalid value ({type(exc).__name__}: {exc})", param=param) from None
        if self.engine is None or self.engine.errored:
            raise APIError(503, f"tier {self.tier_name}: engine is dead, replica restarting")
        handler = self.serving[endpoint]
        with self.tracing.span("tierserve.engine", model=self.tier.served_name):
            if endpoint == "chat":
                result = await handler.create_chat_completion(request, None)
            else:
                result = await handler.create_completion(request, None)
        error = getattr(result, "error", None)
        if error is not None:
            raise from_vllm_error(error.model_dump())
        return result

    def _map_exception(self, exc: Exception) -> APIError:
        """vLLM's own exception -> status mapping (validation 400, not found 404, engine 5xx)."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        error = create_error_response(exc).error.model_dump()
        if int(error.get("code") or 500) >= 500:
            log.exception("tier %s: engine failure", self.tier_name, exc_info=exc)
            error["message"] = f"tier {self.tier_name}: engine failure: {error.get('message')}"
        return from_vllm_error(error)

    async def complete(self, endpoint: str, body: dict[str, Any], trace: dict[str, str] | None = None) -> Result:
        with self.tracing.span("tierserve.tier", parent=trace, tier=self.tier_name, endpoint=endpoint):
            return await self._complete(endpoint, body)

    async def _complete(self, endpoint: str, body: dict[str, Any]) -> Result:
        try:
            result = await self._start(endpoint, body)
        except APIError as exc:
            return Result.error(exc)
        if not hasattr(result, "model_dump"):  # a generator: the body asked for stream=true
            return Result.error(APIError(400, "stream=true must use the streaming path", param="stream"))
        usage = result.usage
        # NON_STR_KEYS: `prompt_logprobs` are keyed by token id; JSON writes those keys as strings (as vLLM does).
        body = orjson.dumps(result.model_dump(exclude_none=True), option=orjson.OPT_NON_STR_KEYS)
        return Result(200, body, usage.prompt_tokens, usage.completion_tokens or 0)

    async def stream(
        self, endpoint: str, body: dict[str, Any], trace: dict[str, str] | None = None, coalesce: bool = True
    ) -> AsyncIterator[bytes | Result | Usage]:
        """Yield an error Result alone, or SSE bytes, then a Usage, then `[DONE]`. `coalesce` (the Ray path)
        sends the chunks already produced together, so a busy engine costs fewer Ray object transfers without
        delaying any token; an embedded tier (LocalTier) passes each chunk straight on, with no task hop."""
        with self.tracing.span("tierserve.tier", parent=trace, tier=self.tier_name, endpoint=endpoint, stream=True):
            options = body.get("stream_options")
            client_wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            if options is None or isinstance(options, dict):
                # Always ask vLLM for the final usage chunk: metrics and budgets count streamed tokens too.
                body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
            try:
                result = await self._start(endpoint, body)
            except APIError as exc:
                yield Result.error(exc)
                return
            if hasattr(result, "model_dump"):
                yield Result.error(APIError(400, "stream=false must use the non-streaming path", param="stream"))
                return
            items = self._items(result, client_wants_usage)
            if coalesce:
                items = _coalesced(items)
            async with contextlib.aclosing(items):  # closed now, not when collected: aborts in the engine
                async for item in items:
                    yield item

    async def _items(self, result: AsyncIterator[str], client_wants_usage: bool) -> AsyncIterator[bytes | Usage]:
        """vLLM's SSE strings as bytes, with the usage as a Usage item after the data and before `[DONE]` (a
        client hangs up on [DONE], and anything still owed after it turns a finished response into a
        cancelled one). Closing this generator closes vLLM's, which aborts the request in the engine."""
        usage: Usage | None = None
        done = False
        try:
            async with contextlib.aclosing(result):  # our close reaches vLLM's generator at once
                async for chunk in result:
                    if chunk.startswith(USAGE_CHUNK_PREFIX) and '"choices":[]' in chunk:
                        counts = orjson.loads(chunk[6:])["usage"]
                        usage = Usage(counts["prompt_tokens"], counts.get("completion_tokens") or 0)
                        if not client_wants_usage:
                            continue
                    elif chunk == DONE_TEXT:
                        done = True  # vLLM's last item: held until the usage has gone
                        continue
                    yield _translate_sse(chunk)
        except Exception as exc:  # the stream has started: report in-stream, in the same envelope
            yield self._map_exception(exc).sse()
        if usage is not None:
            yield usage
        if done:
            yield DONE

    # -- health and telemetry -----------------------------------------------------------------------

    async def probe(self) -> float:
        """Generate one token straight through the engine: proof of life that /health/ready can trust."""
        from vllm import SamplingParams

        if self.engine is None:
            raise RuntimeError(f"tier {self.tier_name}: engine stopped")
        start = time.perf_counter()
        params = SamplingParams(max_tokens=1, temperature=0)
        async for _ in self.engine.generate({"prompt": "ok"}, params, request_id=f"probe-{uuid.uuid4().hex}"):
            pass
        return time.perf_counter() - start

    def engine_metrics(self) -> tuple[str, str]:
        """(replica id, vLLM's own metrics of this replica's engine as exposition text)."""
        from prometheus_client import REGISTRY

        return self.replica_id, engine_metrics_text(REGISTRY)

    def waiting(self) -> int:
        """Requests queued in this replica's engine (what the router reads every few seconds)."""
        from prometheus_client import REGISTRY

        return engine_waiting(REGISTRY)

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
        return 0 if self.engine is None or self.engine.errored else 1

    def shutdown(self) -> None:
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


class LocalTier:
    """A TierServer in the caller's own process, called the way a Ray Serve handle is
    (`tier.complete.remote(...)`, `tier.options(stream=True).stream.remote(...)`), so the ingress has one
    request path for embedded and remote tiers. A call is a task on the running loop: no thread, no copy,
    no serialisation."""

    def __init__(self, server: TierServer, make: Callable[[], TierServer]) -> None:
        self.server = server
        self.make = make  # builds a new TierServer (blocking: it loads the model)
        self.replacing: asyncio.Future[None] | None = None
        self.replacements = 0

    def running(self) -> int:
        return self.server.running()

    async def check_health(self) -> None:
        """The embedding replica's health check. A dead engine is replaced in place, in the background: the
        gateway and the other tiers keep serving, and this tier's requests go where its overflow policy says
        until the new engine is up. Only a replacement that fails fails the check (Ray then replaces the
        whole replica)."""
        if self.replacing is not None:
            if not self.replacing.done():
                return
            done, self.replacing = self.replacing, None
            done.result()
        try:
            await self.server.check_health()
        except Exception as exc:
            log.error("tier %s: engine is dead (%s); starting a new one in this replica", self.server.tier_name, exc)
            self.replacing = asyncio.ensure_future(self._replace())

    async def _replace(self) -> None:
        await asyncio.to_thread(self.server.shutdown)
        self.server = await asyncio.to_thread(self.make)
        self.replacements += 1
        log.info("tier %s: new engine ready (replacement %d)", self.server.tier_name, self.replacements)

    def options(self, *, stream: bool = False) -> LocalTier:
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_") or name not in TIER_METHODS:
            raise AttributeError(name)
        if name == "stream":  # in process: no Ray transfer per chunk to save, so no coalescing task either
            return _LocalMethod(partial(self.server.stream, coalesce=False))
        return _LocalMethod(getattr(self.server, name))


TIER_METHODS = frozenset({"complete", "stream", "probe", "engine_metrics", "waiting", "gpu_snapshot"})


class _LocalMethod:
    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        if inspect.isasyncgenfunction(self.fn):
            return LocalStream(self.fn(*args))
        if inspect.iscoroutinefunction(self.fn):
            return asyncio.ensure_future(self.fn(*args))
        return asyncio.ensure_future(asyncio.to_thread(self.fn, *args))  # NVML and registry reads may block


class LocalStream:
    """An in-process stream with a handle's `cancel()`: closing it aborts the request in the engine."""

    __slots__ = ("gen",)

    def __init__(self, gen: AsyncIterator[Any]) -> None:
        self.gen = gen

    def __aiter__(self) -> LocalStream:
        return self

    def __anext__(self) -> Any:
        return self.gen.__anext__()

    def cancel(self) -> None:
        task = asyncio.ensure_future(_close(self.gen))
        _closing.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


async def _close(gen: Any) -> None:
    # The generator's own `finally` aborts the engine request. One that is mid-step was already closed by its
    # cancelled step (aclose() then says "already running").
    with contextlib.suppress(RuntimeError):
        await gen.aclose()


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


def _culprit(request_type: Any, body: dict[str, Any]) -> str | None:
    """The top-level field without which `body` validates (error path only: one validation per field)."""
    for name in body:
        if name in ("model", "messages", "prompt"):
            continue
        try:
            request_type.model_validate({k: v for k, v in body.items() if k != name})
        except Exception:
            continue
        return name
    return None


async def _coalesced(items: AsyncIterator[bytes | Usage]) -> AsyncIterator[bytes | Usage]:
    """The same items, with SSE bytes already waiting joined into one: a pump task reads ahead into a queue."""
    queue: asyncio.Queue[bytes | Usage | None] = asyncio.Queue()

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
    if chunk.startswith('data: {"error"'):
        try:
            error = orjson.loads(chunk[6:].strip())["error"]
            return from_vllm_error(error).sse()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    return chunk.encode()
