"""The OpenAI-compatible HTTP surface: parse, resolve the model to a tier, call it, stream back.

Routes only. The tier replica validates the body with vLLM's protocol types and does the generation;
this replica stays thin because every cycle it spends is taken from the engines on the same node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import AppConfig
from serving.errors import APIError, from_validation_errors
from serving.fleet import Fleet, ListCollector
from serving.gpu import SnapshotCollector
from serving.health import ReadinessProber
from serving.telemetry import LOCAL, RequestMetrics, RequestRecord
from serving.tiers import Result, Usage
from serving.tracing import Tracing
from serving.warmup import keep_warm_loop, parse_window

log = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(exc: APIError) -> Response:
    return Response(exc.json(), status_code=exc.status, media_type="application/json", headers=exc.headers)


def json_response(result: Result, headers: dict[str, str]) -> Response:
    return Response(result.body, status_code=result.status, media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the same envelope, whoever raised it."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def build_fastapi() -> FastAPI:
    app = FastAPI(title="tierserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    return app


# Ray Serve's ingress pattern: routes are declared on the class against one FastAPI app.
api = build_fastapi()


class Ingress:
    """Holds the tier handles; `serving.app` wraps it with serve.deployment + serve.ingress(api)."""

    def __init__(self, config: AppConfig, tiers: dict[str, Any]) -> None:
        self.config = config
        self.tiers = tiers
        self.names = config.model_names()
        self.created = int(time.time())
        self.fleet = Fleet(config, tiers, _app_name())
        self.tracing = Tracing("tierserve-ingress")
        self.registry = CollectorRegistry()  # per ingress, no process-global state
        self.metrics = RequestMetrics(self.registry)
        self.registry.register(SnapshotCollector(lambda: self.fleet.gpu_snapshots))
        self.registry.register(ListCollector(lambda: self.fleet.engine_families))
        self.keep_warm = {
            name: (parse_window(kw[0]), kw[1]) for name, t in config.tiers.items() if (kw := t.replicas.keep_warm())
        }
        self.keep_warm_task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no loop yet: started on the first request instead
            self.start_keep_warm()
        self.prober = ReadinessProber(
            probe=lambda tier: self.tiers[tier].probe.remote(),
            running_replicas=self.fleet.running_replicas,
            scale_to_zero={name: self.fleet.scales_to_zero(name) for name in config.tiers},
            cache_s=config.ingress.ready_cache_s,
            timeout_s=config.ingress.ready_timeout_s,
        )

    def start_keep_warm(self) -> None:
        if self.keep_warm and self.keep_warm_task is None:
            loop = asyncio.get_running_loop()
            self.keep_warm_task = loop.create_task(keep_warm_loop(self.keep_warm, self.prober.probe))

    # -- operational routes -------------------------------------------------------------------------

    @api.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/health/ready")
    async def ready(self) -> Response:
        status, body = await self.prober.report()
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    @api.get("/health/gpus")
    async def gpus(self) -> dict[str, Any]:
        return {"nodes": [s.to_dict() for s in await self.fleet.refresh_gpus()]}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        await asyncio.gather(self.fleet.refresh_engine_metrics(self.metrics), self.fleet.refresh_gpus())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI routes ------------------------------------------------------------------------------

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        data = []
        for name, tier_name in self.names.items():
            tier = self.config.tiers[tier_name]
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "tierserve",
                    "tier": tier_name,
                    "served_name": tier.served_name,
                    "max_model_len": tier.engine.max_model_len,
                }
            )
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.generate("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.generate("completion", request)

    async def generate(self, endpoint: str, request: Request) -> Response:
        if self.keep_warm and self.keep_warm_task is None:
            self.start_keep_warm()
        with self.tracing.span("tierserve.ingress", endpoint=endpoint) as span:
            try:
                body = await read_body(request)
                with self.tracing.span("tierserve.route"):
                    tier_name = self.resolve(body)
                stream = body.get("stream", False)
                if not isinstance(stream, bool):
                    raise APIError(400, "stream: must be a boolean", param="stream")
            except APIError as exc:
                self.metrics.requests.labels("none", LOCAL, endpoint, str(exc.status)).inc()
                raise
            if span is not None:
                span.set_attributes({"tierserve.tier": tier_name, "tierserve.stream": stream})
            record = self.metrics.begin(tier_name, endpoint)
            headers = {"x-tierserve-tier": tier_name, "x-tierserve-provider": LOCAL}
            call = _Call(self.tiers[tier_name], tier_name, endpoint, body, self.tracing.carrier())
            try:
                return await self._call(call, stream, headers, record)
            except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
                # The replica died mid-call or its queue is full: retryable, say so.
                record.finish(503)
                raise APIError(
                    503, f"tier {tier_name} is unavailable: {type(exc).__name__}", headers={"retry-after": "5"}
                ) from None
            except BaseException:
                record.finish(500)  # no-op when the record already finished
                raise

    async def _call(self, call: _Call, stream: bool, headers: dict[str, str], record: RequestRecord) -> Response:
        if not stream:
            result: Result = await call.handle.complete.remote(call.endpoint, call.body, call.trace)
            record.finish(result.status, result.prompt_tokens, result.completion_tokens)
            return json_response(result, headers)

        chunks = call.handle.options(stream=True).stream.remote(call.endpoint, call.body, call.trace)
        # Peek before sending headers: an early failure becomes a real HTTP status, not a 200 stream.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise APIError(502, f"tier {call.tier} ended the stream without data") from None
        if isinstance(first, Result):
            record.finish(first.status)
            return json_response(first, headers)
        record.first()
        return StreamingResponse(
            _relay(first, chunks, record), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )

    def resolve(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            raise APIError(400, "model: field required", param="model")
        if not isinstance(model, str):
            raise APIError(400, "model: must be a string", param="model")
        tier = self.names.get(model)
        if tier is None:
            known = ", ".join(sorted(self.names))
            message = f"The model `{model}` does not exist. Known: {known}"
            raise APIError(404, message, param="model", code="model_not_found")
        return tier


@dataclass(slots=True)
class _Call:
    handle: Any
    tier: str
    endpoint: str
    body: dict[str, Any]
    trace: dict[str, str] | None


async def _relay(first: bytes, rest: AsyncIterator[bytes | Usage], record: RequestRecord) -> AsyncIterator[bytes]:
    """Forward SSE bytes; the tier's closing Usage item feeds the metrics and is not sent."""
    status: int | str = "stream_error"  # ended without the engine's usage: cut or failed mid-stream
    usage = Usage(0, 0)
    try:
        yield first
        async for chunk in rest:
            if isinstance(chunk, Usage):
                usage, status = chunk, 200
            else:
                yield chunk
    except asyncio.CancelledError:
        status = 499  # the client went away; closing `rest` cancels the request in the engine
        raise
    finally:
        record.finish(status, usage.prompt_tokens, usage.completion_tokens)


def _app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # built outside a replica (unit use)
        return "tierserve"
