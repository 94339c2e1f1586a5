"""Admission: who is asking, may they, and where does it go. Every generation request enters here once.

`admit` runs, in order: authenticate (401) → read the body under the size and upload-time limits (413/408)
→ parse it (400) → check its shape (400 naming the field) → for the Responses API, inline the conversation
that `previous_response_id` continues (404 when the key has no such response) → route (the pure router: 404
unknown model, 400 too long, 429/503 no capacity) → the key's tier allowlist (403) and the tier's max_tokens
cap (400) → the key's rate, tokens and budget (429, and the request is counted). It returns one `Admitted`,
holding the `Ticket` that accounts the request when it ends; a refusal is accounted here. Checks that reject
cost no engine time; a 401 never reads the body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from serving.config import AppConfig, Endpoint
from serving.gateway.accounting import UNAUTHENTICATED, Accounting, Ticket
from serving.gateway.conversations import Conversations
from serving.gateway.limits import check_request, check_tier_cap, read_limited, tier_max_tokens
from serving.gateway.router import Decision, RequestFacts, facts_from_body
from serving.gateway.sessions import SessionTiers, session_of
from serving.security.isolation import cache_scope
from serving.security.keys import KeyRecord, KeyStore, check_tier
from serving.security.quotas import Limiter
from serving.wire.errors import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that may be served: its key, body, routing decision, and the ticket that accounts it."""

    key: KeyRecord
    endpoint: Endpoint
    body: dict[str, Any]  # what the backend gets (a Responses request: its conversation inlined)
    received: dict[str, Any]  # the body as the client sent it
    stream: bool
    facts: RequestFacts
    decision: Decision
    ticket: Ticket
    scope: str | None = None  # whose cached work it may share (serving/security/isolation.py); None: everyone's
    session: str = ""  # the conversation it belongs to (serving/gateway/sessions.py)


class Admission:
    def __init__(
        self, config: AppConfig, keys: KeyStore, limiter: Limiter, accounting: Accounting,
        conversations: Conversations | None = None,
    ) -> None:
        self.config = config
        self.conversations = conversations  # the Responses API's stored responses; None: previous ids unknown
        self.limits = config.limits
        self.keys = keys
        self.limiter = limiter
        self.accounting = accounting
        self.caps = {name: tier_max_tokens(tier, config.limits) for name, tier in config.tiers.items()}
        self.session_tiers = SessionTiers()

    async def admit(self, request: Request, endpoint: Endpoint, route: Callable[[RequestFacts], Decision]) -> Admitted:
        """The whole admission of one generation request; APIError (already accounted) when it is refused."""
        key: KeyRecord | None = None
        tier: str | None = None
        try:
            key = self.keys.authenticate(credentials(request))
            received = await self.read_body(request)
            check_request(endpoint, received, None, self.limits)
            model = received.get("model")
            if not isinstance(model, str):
                why = "field required" if model is None else "must be a string"
                raise APIError(400, f"model: {why}", param="model")
            # The salt of vLLM's prefix cache is the key's scope, never the client's (one team's salt in another's
            # hands would let it probe that team's cached prompts).
            body = {k: v for k, v in received.items() if k != "cache_salt"}
            if endpoint == "responses" and self.conversations is not None:
                # Before routing: the size of the whole conversation decides where it fits.
                body = self.conversations.continue_request(key.id, body)
            session = session_of(request.headers, key.id, endpoint, body)
            auto = model == "auto"
            facts = facts_from_body(endpoint, body, request.headers, self.config.routing,
                                    default_tier=key.default_tier, allowed=key.tiers, priority=key.priority,
                                    session_tier=self.session_tiers.get(session) if auto else None)
            decision = route(facts)
            tier = decision.tier
            if decision.kind == "reject" or tier is None:
                raise decision.error()
            if auto:
                self.session_tiers.remember(session, tier)
            check_tier(key, tier)
            check_tier_cap(body, self.caps[tier], endpoint)
            self.limiter.check(key)
        except APIError as exc:
            self.accounting.rejected(key.agent if key else UNAUTHENTICATED, tier, endpoint, exc.status)
            raise
        ticket = self.accounting.open(key, tier, endpoint)
        return Admitted(key, endpoint, body, received, bool(body.get("stream")), facts, decision, ticket,
                        scope=cache_scope(self.config.cache.isolation, key), session=session)

    # -- the other routes: a key, and a body for the admin ones --------------------------------------------

    def authenticate(self, request: Request) -> KeyRecord:
        try:
            return self.keys.authenticate(credentials(request))
        except APIError as exc:
            self.accounting.agent_answered(UNAUTHENTICATED, exc.status)
            raise

    def authenticate_admin(self, request: Request) -> KeyRecord:
        return self.keys.authenticate_admin(request.headers.get("authorization"))

    async def read_body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read under the size and upload-time limits."""
        raw = await read_limited(request.stream(), self.limits, request.headers.get("content-length"))
        return parse_json_object(raw)


def credentials(request: Request) -> str | None:
    """The `Authorization` header, or Anthropic's `x-api-key` (what the Anthropic SDK and Claude Code send)
    as a bearer token."""
    header = request.headers.get("authorization")
    if header is None and (api_key := request.headers.get("x-api-key")) is not None:
        return f"Bearer {api_key}"
    return header


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson also rejects invalid UTF-8 here, with its own message: say which it was.
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object (got {type(body).__name__})", code="invalid_value")
    return body
