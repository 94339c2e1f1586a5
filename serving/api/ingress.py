"""The ingress replica: its HTTP routes, and the gateway it builds once (its composition root).

A generation request reads one way: route → `Admission.admit` (key, body, shape, router, tier, limits; one
entry) → `Dispatcher.dispatch` (candidates in order, first-chunk peek, fail-over before the first byte) →
a backend (a tier deployment's handle, the tier embedded here, or the provider deployment) → the response;
its `Ticket` accounts it once when it ends. The routes here only translate HTTP to that path and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.streaming import SSEResponse
from serving.backends.handle import HandleBackend
from serving.backends.local import LocalTier
from serving.backends.tier import TierServer
from serving.config import AppConfig, AuthSettings, Endpoint
from serving.gateway.accounting import Accounting
from serving.gateway.admission import Admission, Admitted
from serving.gateway.conversations import Conversations, ResponseStore
from serving.gateway.dispatch import Answer, Dispatcher
from serving.gateway.dispatch import Request as Dispatch
from serving.gateway.ejection import Ejector
from serving.gateway.fleet import Fleet, ListCollector
from serving.gateway.readiness import ReadinessProber
from serving.gateway.response_cache import ResponseCache
from serving.gateway.router import Candidate, Decision, RequestFacts, Router
from serving.gateway.slots import BatchSlots
from serving.gateway.warmup import keep_warm_loop, parse_window
from serving.ops.gpu import SnapshotCollector
from serving.ops.metrics import AgentMetrics, RequestMetrics
from serving.ops.tracing import Tracing
from serving.security.keys import PRIORITY_VALUE, KeySpec, KeyStore, KeyStoreError, usage_db_path
from serving.security.quotas import Limiter
from serving.security.redaction import auth_disabled_warning, redact_replica_logs
from serving.spend.ledger import Budget
from serving.wire.backend import TierBackend
from serving.wire.errors import APIError, Protocol, from_validation_errors, protocol_of, render_json

log = logging.getLogger(__name__)

def error_response(exc: APIError, protocol: Protocol = "openai") -> Response:
    return Response(render_json(exc, protocol), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


def route_protocol(request: Request) -> Protocol:
    """The error shape a route's clients expect: Anthropic's on /v1/messages*, OpenAI's everywhere else."""
    return "anthropic" if request.url.path.startswith("/v1/messages") else "openai"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in its route's protocol's envelope, whoever raised it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, route_protocol(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation_errors(list(exc.errors())), route_protocol(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail)), route_protocol(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"), route_protocol(request))


def build_fastapi() -> FastAPI:
    app = FastAPI(title="tierserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    return app


# Ray Serve's ingress pattern: routes are declared on the class against one FastAPI app.
api = build_fastapi()


class Ingress:
    """Holds the gateway; `serving.app` wraps it with serve.deployment + serve.ingress(api)."""

    def __init__(
        self,
        config: AppConfig,
        tiers: dict[str, Any],
        fallback: Any = None,
        state_dir: str = "",
        auth_settings: AuthSettings | None = None,
        cache_dir: str = "",
    ) -> None:
        redact_replica_logs()  # this replica's logs never show a key, whoever logs it
        self.config = config
        backends: dict[str, TierBackend] = {name: HandleBackend(handle) for name, handle in tiers.items()}
        self.embedded: LocalTier | None = None
        local: dict[str, LocalTier] = {}  # tiers the fleet counts in this process, not through the controller
        if config.ingress.embed_tier is not None:
            # Requests for this tier go to an engine in this process: no Ray hop, no copy per chunk.
            name = config.ingress.embed_tier
            make = partial(TierServer, name, config.tiers[name], cache_dir)
            self.embedded = LocalTier(make(), make)
            backends[name] = local[name] = self.embedded
        self.tiers = backends
        self.fallback = fallback  # the provider deployment's handle (its states); None without providers
        self.names = config.model_names()
        self.created = int(time.time())
        self.tracing = Tracing("tierserve-ingress")
        self.log_prompts = config.auth.log_prompts

        self.registry = CollectorRegistry()  # per ingress, no process-global state
        self.metrics = RequestMetrics(self.registry)
        self.router = Router(config)
        self.ejector = Ejector(config.tiers, threshold=config.routing.ejection.consecutive_failures,
                               on_change=self._ejection_changed)
        self.fleet = Fleet(config, backends, _app_name(), local, self.ejector)
        self.keys = KeyStore.from_config(config, Path(state_dir), auth_settings)
        self.limiter = Limiter(ledger=Budget(usage_db_path(config.auth, Path(state_dir)), config.providers))
        accounting = Accounting(config.tiers, self.metrics, AgentMetrics(self.registry), self.limiter)
        self.conversations = Conversations(ResponseStore(usage_db_path(config.auth, Path(state_dir)).with_name(
            "responses.db")))
        self.admission = Admission(config, self.keys, self.limiter, accounting, self.conversations)
        self.dispatcher = Dispatcher(config, backends, HandleBackend(fallback) if fallback is not None else None,
                                     attempted=self._attempted, ejector=self.ejector,
                                     late_first_byte=self.fleet.first_byte_late,
                                     replicas=lambda tier: self.fleet.replicas.get(tier),
                                     batch_slots=BatchSlots(on_change=self.metrics.batch_slots_changed))
        self.response_cache = ResponseCache(config.cache.responses, on_change=self.metrics.response_cache_changed)
        if warning := auth_disabled_warning(config):
            log.warning(warning)

        self.registry.register(SnapshotCollector(lambda: self.fleet.gpu_snapshots))
        self.registry.register(ListCollector(lambda: self.fleet.engine_families))
        self.keep_warm = {
            name: (parse_window(kw[0]), kw[1]) for name, t in config.tiers.items() if (kw := t.replicas.keep_warm())
        }
        self.keep_warm_task: asyncio.Task[None] | None = None
        self.prober = ReadinessProber(
            probe=lambda tier: self.tiers[tier].probe(),
            running_replicas=self.fleet.running_replicas,
            scale_to_zero={name: self.fleet.scales_to_zero(name) for name in config.tiers},
            recount=self.fleet.recount,
            passed=self.fleet.probe_passed,
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
            embedded.shutdown()
        tracing = getattr(self, "tracing", None)
        if tracing is not None:
            tracing.shutdown()  # flush the last spans when Ray Serve stops this replica

    # -- generation: the request path -----------------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.generate("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.generate("completion", request)

    @api.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self.generate("responses", request)

    @api.get("/v1/responses/{response_id}")
    def get_response(self, response_id: str, request: Request) -> Response:
        """A stored response of the calling key's (another key's is as absent as one never made)."""
        found = self.conversations.store.get(self.admission.authenticate(request).id, response_id)
        if found is None:
            raise _no_response(response_id)
        return Response(orjson.dumps(found), media_type="application/json")

    @api.delete("/v1/responses/{response_id}")
    def delete_response(self, response_id: str, request: Request) -> dict[str, Any]:
        if not self.conversations.store.delete(self.admission.authenticate(request).id, response_id):
            raise _no_response(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @api.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        return await self.generate("messages", request)

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request) -> Response:
        return await self.generate("count_tokens", request)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self.generate("embeddings", request)

    async def generate(self, endpoint: Endpoint, request: Request) -> Response:
        if self.fleet.refreshing is None:
            self.start_background()
        with self.tracing.span("tierserve.ingress", endpoint=endpoint) as span:
            admitted = await self.admission.admit(request, endpoint, self.route)
            decision = admitted.decision
            if span is not None:
                span.set_attributes({"tierserve.tier": decision.tier or "", "tierserve.reason": decision.reason,
                                     "tierserve.agent": admitted.key.agent})
            if self.log_prompts:  # off by default: prompts are the agents' data
                log.info("request agent=%s tier=%s body=%s", admitted.key.agent, decision.tier,
                         orjson.dumps(admitted.body).decode())
            call = Dispatch(endpoint, admitted.body, admitted.stream, admitted.facts.prompt_tokens,
                            self.tracing.carrier(), PRIORITY_VALUE[admitted.key.priority],
                            batch=admitted.key.priority == "batch", cache_salt=admitted.scope,
                            session=admitted.session)
            answer = await self._answer(admitted, call, request)
            keep = endpoint == "responses"  # the Responses API's own state: the caller's stored responses
            owner = admitted.key.id
            if answer.chunks is not None:
                chunks = answer.chunks
                if keep:
                    chunks = self.conversations.streamed(owner, admitted.received, admitted.body, chunks)
                return SSEResponse(chunks, answer.headers)
            result = answer.result
            assert result is not None
            body, protocol = result.body, protocol_of(endpoint)
            if result.status >= 400 and protocol == "anthropic":  # error Results carry OpenAI's envelope
                body = render_json(APIError.from_body(result.status, result.body), protocol)
            elif result.status == 200 and keep:
                body = await self.conversations.answered(owner, admitted.received, admitted.body, body)
            return Response(body, status_code=result.status, media_type="application/json", headers=answer.headers)

    async def _answer(self, admitted: Admitted, call: Dispatch, request: Request) -> Answer:
        """From the response cache when it holds this answer, else from the dispatcher (and then kept)."""
        tier = admitted.decision.tier
        assert tier is not None
        lookup = self.response_cache.lookup(
            enabled=self.config.tiers[tier].response_cache and admitted.key.response_cache,
            endpoint=admitted.endpoint, body=admitted.body, scope=admitted.scope, tier=tier, headers=request.headers)
        if lookup.result is None:
            return await self.dispatcher.dispatch(admitted.decision, call, admitted.ticket)
        self.metrics.response_cache.labels(tier, lookup.result).inc()
        if lookup.hit is not None:
            return self.response_cache.answer(lookup, tier, admitted.ticket)
        fresh = await self.dispatcher.dispatch(admitted.decision, call, admitted.ticket)
        return self.response_cache.keep(lookup, fresh)

    def route(self, facts: RequestFacts) -> Decision:
        with self.tracing.span("tierserve.route"):
            return self.router.route(facts, self.fleet.tier_states(self.metrics), self.fleet.provider_states())

    def _attempted(self, cand: Candidate, failed: bool) -> None:
        """A provider call changes breaker or budget state; a failed tier call may mean a replica is gone:
        either way the router's view is re-read now rather than at its next scheduled refresh."""
        if cand.kind == "provider":
            self.fleet.refresh_soon()
        elif failed:
            self.fleet.refresh_soon(replicas=True)

    def _ejection_changed(self, tier: str, reason: str | None) -> None:
        if reason is not None:
            self.metrics.tier_ejections.labels(tier).inc()
            log.warning("tier %s ejected (%s): its requests go where its overflow policy says until a probe "
                        "generates again", tier, reason)
        else:
            log.warning("tier %s back in routing after %.1fs", tier, self.ejector.last_duration_s.get(tier, 0.0))

    # -- operational routes ---------------------------------------------------------------------------------

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
        """Breaker state, open-until, failures, counts and latency per provider; their spend and budgets; and the
        tiers' own breakers (ejection)."""
        tiers = self.ejector.snapshot()
        if self.fallback is None:
            return {"providers": {}, "budgets": {}, "tiers": tiers}
        snapshot: dict[str, Any] = await asyncio.wait_for(self.fallback.snapshot.remote(), 10)
        return {**snapshot, "tiers": tiers}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        await asyncio.gather(self.fleet.refresh_engine_metrics(self.metrics), self.fleet.refresh_gpus())
        self.fleet.export_readiness(self.metrics)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- the calling key's view -----------------------------------------------------------------------------

    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        """The names this key may use: tiers, served names, aliases, and `auto`."""
        key = self.admission.authenticate(request)
        data = []
        for name, tier_name in self.names.items():
            if not key.allows(tier_name):
                continue
            tier = self.config.tiers[tier_name]
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "tierserve",
                         "tier": tier_name, "served_name": tier.served_name,
                         "max_model_len": tier.engine.max_model_len})
        data.append({"id": "auto", "object": "model", "created": self.created, "owned_by": "tierserve",
                     "tier": None, "served_name": None, "max_model_len": None})
        return {"object": "list", "data": data}

    @api.get("/v1/usage")
    def usage(self, request: Request) -> dict[str, Any]:
        """The calling key's limits, its current minute, and its day and month totals and budget."""
        return self.limiter.usage(self.admission.authenticate(request))

    # -- admin routes: an admin key only (never an agent key), off the /v1 surface --------------------------

    @api.get("/admin/usage")
    def admin_usage(self, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        return self.limiter.usage_all(self.keys.list())

    @api.get("/admin/keys")
    def admin_keys(self, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        return {"object": "list", "data": [k.public() for k in self.keys.list()]}

    @api.post("/admin/keys")
    async def admin_create_key(self, request: Request) -> Response:
        """Create an agent key; the response is the only place its plaintext ever appears."""
        self.admission.authenticate_admin(request)
        spec = KeySpec.parse(await self.admission.read_body(request))
        try:
            plaintext, record = self.keys.create(spec, known_tiers=self.config.tiers)
        except KeyStoreError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        self.keys.reload()
        body = {"key": plaintext, **record.public()}
        return Response(orjson.dumps(body), status_code=201, media_type="application/json")

    @api.delete("/admin/keys/{key_id}")
    def admin_revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        self.admission.authenticate_admin(request)
        try:
            changed = self.keys.revoke(key_id)
        except KeyStoreError as exc:
            raise APIError(404, str(exc), param="key_id", code="not_found") from None
        self.keys.reload()
        return {"object": "list", "data": [k.public() for k in changed]}

    @api.post("/admin/reload")
    def admin_reload(self, request: Request) -> dict[str, Any]:
        """Re-read the key store now (it is also re-read on change within `auth.reload_interval_s`).
        Tier and routing changes are deployed with `serve deploy`, which Ray Serve applies in place."""
        self.admission.authenticate_admin(request)
        self.keys.reload()
        return {"reloaded": "keys", "keys": len(self.keys.list(include_revoked=False))}


def _no_response(response_id: str) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'", param="response_id", code="not_found")


def _app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # built outside a replica (unit use)
        return "tierserve"
