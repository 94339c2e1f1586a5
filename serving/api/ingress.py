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
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.backends.tier import LocalTier, Result, TierServer, Usage
from serving.config import AppConfig, AuthSettings, Settings
from serving.gateway.admission import Admission, KeySpec
from serving.gateway.fleet import Fleet, ListCollector
from serving.gateway.limits import request_timeout_s
from serving.gateway.readiness import ReadinessProber
from serving.gateway.router import Decision, ProviderState, Router, facts_from_body
from serving.gateway.warmup import keep_warm_loop, parse_window
from serving.ops.gpu import SnapshotCollector
from serving.ops.metrics import LOCAL, RequestMetrics, RequestRecord
from serving.ops.tracing import Tracing
from serving.security.keys import KeyRecord, KeyStoreError
from serving.security.redaction import redact_replica_logs
from serving.wire.errors import APIError, from_validation_errors

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


def build_fastapi() -> FastAPI:
    app = FastAPI(title="tierserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    return app


# Ray Serve's ingress pattern: routes are declared on the class against one FastAPI app.
api = build_fastapi()


class Ingress:
    """Holds the tier handles; `serving.app` wraps it with serve.deployment + serve.ingress(api)."""

    def __init__(
        self,
        config: AppConfig,
        tiers: dict[str, Any],
        fallback: Any = None,
        state_dir: str | None = None,
        auth_settings: AuthSettings | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.config = config
        self.embedded: LocalTier | None = None
        if config.ingress.embed_tier is not None:
            # Requests for this tier go to an engine in this process: no Ray hop, no copy per chunk.
            name = config.ingress.embed_tier
            make = partial(TierServer, name, config.tiers[name], cache_dir or str(Settings().cache_dir))
            self.embedded = LocalTier(make(), make)
            tiers = {**tiers, name: self.embedded}
        self.tiers = tiers
        self.fallback = fallback  # the provider deployment's handle; None when no provider is configured
        self.router = Router(config)
        self.names = config.model_names()
        self.created = int(time.time())
        self.fleet = Fleet(config, tiers, _app_name())
        self.tracing = Tracing("tierserve-ingress")
        self.registry = CollectorRegistry()  # per ingress, no process-global state
        self.metrics = RequestMetrics(self.registry)
        redact_replica_logs()  # this replica's logs never show a key, whoever logs it
        self.log_prompts = config.auth.log_prompts
        self.admission = Admission(config, Path(state_dir) if state_dir else Settings().state_dir, self.registry,
                                   auth_settings)
        self.registry.register(SnapshotCollector(lambda: self.fleet.gpu_snapshots))
        self.registry.register(ListCollector(lambda: self.fleet.engine_families))
        self.keep_warm = {
            name: (parse_window(kw[0]), kw[1]) for name, t in config.tiers.items() if (kw := t.replicas.keep_warm())
        }
        self.keep_warm_task: asyncio.Task[None] | None = None
        self.prober = ReadinessProber(
            probe=lambda tier: self.tiers[tier].probe.remote(),
            running_replicas=self.fleet.running_replicas,
            scale_to_zero={name: self.fleet.scales_to_zero(name) for name in config.tiers},
            recount=self.fleet.recount,
            cache_s=config.ingress.ready_cache_s,
            timeout_s=config.ingress.ready_timeout_s,
        )
        with contextlib.suppress(RuntimeError):  # no loop yet: started on the first request instead
            self.start_background()

    def start_background(self) -> None:
        """The router's state refresher and the keep-warm pings; needs the replica's event loop."""
        self.fleet.start_refresher(self.fallback, self.metrics)
        if self.keep_warm and self.keep_warm_task is None:
            loop = asyncio.get_running_loop()
            self.keep_warm_task = loop.create_task(keep_warm_loop(self.keep_warm, self.prober.probe))

    async def check_health(self) -> None:
        """Ray Serve's replica health check: a dead embedded engine is replaced in place (LocalTier); only a
        replacement that failed fails the check, and Ray then replaces this replica."""
        if self.embedded is not None:
            await self.embedded.check_health()

    def __del__(self) -> None:
        embedded = getattr(self, "embedded", None)
        if embedded is not None:
            embedded.server.shutdown()

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

    @api.get("/health/providers")
    async def providers(self) -> dict[str, Any]:
        """Breaker state, open-until, failures, counts and latency per provider and tier; budgets."""
        if self.fallback is None:
            return {"providers": {}, "tiers": {}, "budgets": {}}
        return await asyncio.wait_for(self.fallback.snapshot.remote(), 10)

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        await asyncio.gather(self.fleet.refresh_engine_metrics(self.metrics), self.fleet.refresh_gpus())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI routes ------------------------------------------------------------------------------

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        """The names this key may use: tiers, served names, aliases, and `auto`."""
        key = self.admission.authenticate(request)
        data = []
        for name, tier_name in self.names.items():
            if not key.allows(tier_name):
                continue
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
        data.append({"id": "auto", "object": "model", "created": self.created, "owned_by": "tierserve",
                     "tier": None, "served_name": None, "max_model_len": None})
        return {"object": "list", "data": data}

    @api.get("/v1/usage")
    def usage(self, request: Request) -> dict[str, Any]:
        """The calling key's limits, its current minute, and its day and month totals and budget."""
        return self.admission.usage(self.admission.authenticate(request))

    # -- admin routes: an admin key only (never an agent key), off the /v1 surface ----------------------

    @api.get("/admin/usage")
    def admin_usage(self, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        return self.admission.usage_all()

    @api.get("/admin/keys")
    def admin_keys(self, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        return {"object": "list", "data": [k.public() for k in self.admission.keys.list()]}

    @api.post("/admin/keys")
    async def admin_create_key(self, request: Request) -> Response:
        """Create an agent key; the response is the only place its plaintext ever appears."""
        self.admission.authenticate_admin(request)
        spec = KeySpec.parse(await self.admission.read_body(request))
        try:
            plaintext, record = self.admission.keys.create(
                spec.agent, spec.tiers, spec.rpm, spec.tpm, spec.budget_usd, spec.default_tier,
                budget_period=spec.budget_period, known_tiers=self.config.tiers,
            )
        except KeyStoreError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        self.admission.keys.reload()
        body = {"key": plaintext, **record.public()}
        return Response(orjson.dumps(body), status_code=201, media_type="application/json")

    @api.delete("/admin/keys/{key_id}")
    def admin_revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        try:
            changed = self.admission.keys.revoke(key_id)
        except KeyStoreError as exc:
            raise APIError(404, str(exc), param="key_id", code="not_found") from None
        self.admission.keys.reload()
        return {"object": "list", "data": [k.public() for k in changed]}

    @api.post("/admin/reload")
    def admin_reload(self, request: Request) -> dict[str, Any]:
        """Re-read the key store now (it is also re-read on change within `auth.reload_interval_s`).
        Tier and routing changes are deployed with `serve deploy`, which Ray Serve applies in place."""
        self.admission.authenticate_admin(request)
        self.admission.keys.reload()
        return {"reloaded": "keys", "keys": len(self.admission.keys.list(include_revoked=False))}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.generate("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.generate("completion", request)

    async def generate(self, endpoint: str, request: Request) -> Response:
        if self.fleet.refreshing is None:
            self.start_background()
        admission = self.admission
        with self.tracing.span("tierserve.ingress", endpoint=endpoint) as span:
            try:
                key = admission.authenticate(request)
                body = await admission.read_body(request)
                admission.check_shape(key, endpoint, body)
                stream = bool(body.get("stream"))  # a bool or null: check_shape said so
                with self.tracing.span("tierserve.route"):
                    decision, prompt_tokens = self.route(endpoint, body, request.headers, key)
                tier = decision.tier or "none"
                admission.admit(key, endpoint, body, tier)
            except APIError as exc:
                self.metrics.requests.labels("none", LOCAL, endpoint, str(exc.status)).inc()
                raise
            if span is not None:
                span.set_attributes({"tierserve.tier": tier, "tierserve.reason": decision.reason,
                                     "tierserve.agent": key.agent})
            if self.log_prompts:  # off by default: prompts are the agents' data
                log.info("request agent=%s tier=%s body=%s", key.agent, tier, orjson.dumps(body).decode())
            record = self.metrics.begin(tier, endpoint)
            record.on_finish = lambda rec, status, prompt, completion, cost, took: admission.account(
                key, status, admission.spend(rec.tier, rec.provider, took, prompt, completion, cost)
            )
            try:
                return await self._serve(decision, prompt_tokens, endpoint, body, stream, record)
            except BaseException:
                record.finish(500)  # no-op when the record already finished
                raise

    def route(self, endpoint: str, body: dict[str, Any], headers: Any, key: KeyRecord) -> tuple[Decision, int]:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "model: " + ("field required" if model is None else "must be a string"), param="model")
        facts = facts_from_body(
            endpoint, body, headers, self.config.routing,  # type: ignore[arg-type]
            default_tier=key.default_tier, allowed=key.tiers,
        )
        decision = self.router.route(facts, self.fleet.tier_states(self.metrics), self.provider_states())
        if decision.kind == "reject":
            raise decision.error()
        return decision, facts.prompt_tokens

    async def _serve(
        self,
        decision: Decision,
        prompt_tokens: int,
        endpoint: str,
        body: dict[str, Any],
        stream: bool,
        record: RequestRecord,
    ) -> Response:
        """Try the decision's candidates in order until one starts an answer; nothing is retried after the
        first byte has gone to the client."""
        trace = self.tracing.carrier()
        reason = decision.reason
        failures: list[str] = []
        last: Result | None = None
        for i, cand in enumerate(decision.candidates):
            if i:
                self.metrics.fallbacks.labels(decision.tier or "none", _reason_label(last)).inc()
                reason = f"fallback after {failures[-1]}"
            provider = LOCAL if cand.kind == "tier" else cand.name
            record.provider = provider
            headers = {"x-tierserve-tier": cand.tier, "x-tierserve-provider": provider,
                       "x-tierserve-route-reason": _header(reason)}
            target = _Target(cand.kind, cand.name, cand.tier, endpoint, body, trace, prompt_tokens)
            limit = cand.max_wait_s or self.first_byte_timeout(cand.tier, cand.kind)
            answer = await self._attempt(target, stream, limit)
            if cand.kind == "provider":
                self.fleet.refresh_soon()
            if isinstance(answer, Result) and answer.failover:
                if cand.kind == "tier":
                    self.fleet.refresh_soon(replicas=True)  # a replica may be gone: re-read the counts now
                last = answer
                failures.append(f"{cand.kind} {cand.name} failed ({answer.status}: {_error_message(answer)[:160]})")
                continue
            if isinstance(answer, Result):
                record.finish(answer.status, answer.prompt_tokens, answer.completion_tokens, answer.cost_usd)
                return json_response(answer, headers)
            first, chunks = answer
            record.first()
            return StreamingResponse(
                _relay(first, chunks, record), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
            )
        # Every candidate failed before answering: the last error, always with a Retry-After.
        status = last.status if last is not None and last.status in (429, 503) else 503
        record.finish(status)
        message = f"no target could serve the request: {'; '.join(failures) or 'no candidates'}"
        if decision.skipped:
            message += " (skipped: " + "; ".join(f"{who}: {why}" for who, why in decision.skipped) + ")"
        raise APIError(status, message, headers={"retry-after": (last.retry_after if last else None) or "5"})

    async def _attempt(self, t: _Target, stream: bool, limit: float) -> Result | tuple[bytes, Any]:
        """One candidate: a Result (answer or error) or, for a started stream, (first chunk, the rest)."""
        if t.kind == "tier":
            handle, args = self.tiers[t.name], (t.endpoint, t.body, t.trace)
        else:
            handle, args = self.fallback, (t.name, t.endpoint, t.body, t.tier, t.prompt_tokens)
        try:
            if not stream:
                response = handle.complete.remote(*args)
                try:
                    return await asyncio.wait_for(response, limit)
                except TimeoutError:
                    response.cancel()
                    raise
            chunks = handle.options(stream=True).stream.remote(*args)
            try:
                # Peek before sending headers: an early failure becomes a real HTTP status or a fail-over.
                first = await asyncio.wait_for(chunks.__anext__(), limit)
            except TimeoutError:
                chunks.cancel()
                raise
        except TimeoutError:
            return Result.error(_timeout(t.name, limit))
        except StopAsyncIteration:
            return Result.error(APIError(502, f"{t.kind} {t.name} ended the stream without data"))
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            # The replica died mid-call or its queue is full: retryable elsewhere.
            return Result.error(APIError(503, f"{t.kind} {t.name} is unavailable: {type(exc).__name__}"))
        except RayTaskError:
            raise  # the tier's own code failed (a bug, since tier calls return their errors): a 500, not hidden
        except Exception as exc:
            # Transport trouble between the replicas (e.g. a new replica's gRPC server not yet answering
            # while the tier scales up): nothing has reached the client, so another candidate may answer.
            log.warning("%s %s: call failed before answering: %r", t.kind, t.name, exc)
            return Result.error(APIError(503, f"{t.kind} {t.name} is unavailable: {type(exc).__name__}"))
        if isinstance(first, Result):
            return first
        return first, chunks

    def provider_states(self) -> dict[str, ProviderState]:
        return self.fleet.provider_states()

    def first_byte_timeout(self, tier: str, kind: str = "tier") -> float:
        """A tier that scales to zero may be warming up: bound that wait by its overflow policy."""
        t = self.config.tiers[tier]
        limit = request_timeout_s(self.config)
        return min(limit, t.overflow.max_cold_wait_s) if kind == "tier" and t.replicas.min == 0 else limit



def _timeout(tier: str, limit: float) -> APIError:
    message = f"tier {tier} did not answer within {limit:g}s (no replica ready, or overloaded)"
    return APIError(503, message, code="timeout", headers={"retry-after": "10"})


@dataclass(slots=True)
class _Target:
    kind: str  # "tier" | "provider"
    name: str
    tier: str
    endpoint: str
    body: dict[str, Any]
    trace: dict[str, str] | None
    prompt_tokens: int


def _error_message(result: Result) -> str:
    """The message of an error Result's envelope (failure path only: parsing costs nothing that matters)."""
    try:
        return str(orjson.loads(result.body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "error"


def _header(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:200]


def _reason_label(result: Result | None) -> str:
    """A bounded label for tierserve_fallbacks_total: the kind of failure, never its message."""
    if result is None:
        return "unavailable"
    return {429: "rate_limited", 503: "unavailable", 504: "timeout"}.get(result.status, f"error_{result.status}")


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
        if status != 200:  # went away before the end
            status = 499
        raise
    finally:
        if status != 200:
            rest.cancel()  # type: ignore[attr-defined]  # a handle's stream or a LocalStream: aborts the engine request
        record.finish(status, usage.prompt_tokens, usage.completion_tokens, usage.cost_usd)


def _app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # built outside a replica (unit use)
        return "tierserve"
