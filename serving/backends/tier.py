"""The tier deployment: each replica owns one vLLM AsyncLLM engine in-process.

vLLM's own OpenAI serving classes do the chat templating, sampling-parameter conversion and response /
chunk types; this module only adapts them to the backend interface (serving/wire/backend.py): a `Call` in,
either one `Result` or a stream of SSE bytes and a closing `Usage` out, every error in our one envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from serving.backends.affinity import colocate_engine_cores
from serving.config import ENDPOINTS, Tier
from serving.ops.metrics import engine_metrics_text, engine_waiting
from serving.ops.tracing import Tracing
from serving.wire.errors import APIError, from_validation_errors, from_vllm_error
from serving.wire.items import Call, Result, StreamItem, Usage
from serving.wire.sse import DONE, DONE_TEXT, is_error_event, with_usage

log = logging.getLogger(__name__)

USAGE_CHUNK_PREFIX = 'data: {"id":'  # vLLM's chunks; the usage-only one has `"choices":[]`


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
        self.engine: Any = AsyncLLM.from_engine_args(engine_args(tier, model_path))  # None once shut down
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
        self.serving: dict[str, Any] = {
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
        self.request_types: dict[str, type[BaseModel]] = {"chat": ChatCompletionRequest,
                                                          "completion": CompletionRequest}
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

    async def complete(self, call: Call) -> Result:
        with self.tracing.span("tierserve.tier", parent=call.trace, tier=self.tier_name, endpoint=call.endpoint):
            return await self._complete(call.endpoint, call.body)

    async def _complete(self, endpoint: str, body: dict[str, Any]) -> Result:
        try:
            result = await self._start(endpoint, body)
        except APIError as exc:
            return Result.error(exc)
        if not hasattr(result, "model_dump"):  # a generator: the body asked for stream=true
            return Result.error(APIError(400, "stream=true must use the streaming path", param="stream"))
        usage = result.usage
        # NON_STR_KEYS: `prompt_logprobs` are keyed by token id; JSON writes those keys as strings (as vLLM does).
        data = orjson.dumps(result.model_dump(exclude_none=True), option=orjson.OPT_NON_STR_KEYS)
        return Result(200, data, Usage(usage.prompt_tokens, usage.completion_tokens or 0))

    async def stream(self, call: Call, coalesce: bool = True) -> AsyncIterator[StreamItem]:
        """Yield an error Result alone, or SSE bytes, then a Usage, then `[DONE]`. `coalesce` (the Ray path)
        sends the chunks already produced together, so a busy engine costs fewer Ray object transfers without
        delaying any token; an embedded tier (LocalTier) passes each chunk straight on, with no task hop."""
        endpoint = call.endpoint
        with self.tracing.span("tierserve.tier", parent=call.trace, tier=self.tier_name, endpoint=endpoint,
                               stream=True):
            body, client_wants_usage = with_usage(call.body)
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

    async def _items(
        self, result: AsyncGenerator[str, None], client_wants_usage: bool
    ) -> AsyncGenerator[bytes | Usage, None]:
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


async def _coalesced(items: AsyncIterator[bytes | Usage]) -> AsyncGenerator[bytes | Usage, None]:
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
    if is_error_event(chunk):
        try:
            error = orjson.loads(chunk[6:].strip())["error"]
            return from_vllm_error(error).sse()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    return chunk.encode()
