"""The OpenAI-compatible HTTP surface: parse, resolve the model to a tier, call it, stream back.

Routes only. The tier replica validates the body with vLLM's protocol types and does the generation;
this replica stays thin because every cycle it spends is taken from the engines on the same node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import AppConfig
from serving.errors import APIError, from_validation_errors
from serving.tiers import Result

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

    # -- routes -------------------------------------------------------------------------------------

    @api.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

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
        body = await read_body(request)
        tier_name = self.resolve(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream: must be a boolean", param="stream")
        headers = {"x-tierserve-tier": tier_name}
        try:
            return await self._call(self.tiers[tier_name], tier_name, endpoint, body, stream, headers)
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            # The replica died mid-call or its queue is full: retryable, say so.
            raise APIError(
                503, f"tier {tier_name} is unavailable: {type(exc).__name__}", headers={"retry-after": "5"}
            ) from None

    async def _call(
        self, handle: Any, tier_name: str, endpoint: str, body: dict[str, Any], stream: bool, headers: dict
    ) -> Response:
        if not stream:
            result: Result = await handle.complete.remote(endpoint, body)
            return json_response(result, headers)

        chunks = handle.options(stream=True).stream.remote(endpoint, body)
        # Peek before sending headers: an early failure becomes a real HTTP status, not a 200 stream.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise APIError(502, f"tier {tier_name} ended the stream without data") from None
        if isinstance(first, Result):
            return json_response(first, headers)
        return StreamingResponse(
            _prepend(first, chunks), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
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


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
