"""The dispatcher: tries a routing decision's candidates in order until one starts an answer.

A stream's first chunk is awaited before anything is sent to the client, so an early failure becomes a real
HTTP status or a fail-over to the next candidate; once the first byte has gone, nothing is retried (Envoy's
rule) and a later failure ends the stream with an SSE error event. Every request ends in exactly one
`Ticket.finish`, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serving.config import AppConfig, Endpoint
from serving.gateway.accounting import Status, Ticket
from serving.gateway.router import Candidate, Decision
from serving.ops.metrics import LOCAL
from serving.wire.backend import Backend, ItemStream
from serving.wire.errors import APIError, retry_after
from serving.wire.items import Call, Result, Usage

log = logging.getLogger(__name__)

# The replica died mid-call, or its queue is full: nothing reached the client, another candidate may answer.
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


@dataclass(frozen=True, slots=True)
class Request:
    """What the dispatcher sends, whichever candidate serves it."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    prompt_tokens: int = 0  # the router's estimate: what a provider stream cut before its usage is charged
    trace: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A started answer: one JSON `result`, or a stream (`chunks`, first chunk included). `headers` say which
    tier and provider serve it and why."""

    headers: dict[str, str]
    result: Result | None = None
    chunks: AsyncGenerator[bytes, None] | None = None


class Dispatcher:
    def __init__(
        self,
        config: AppConfig,
        tiers: Mapping[str, Backend],
        fallback: Backend | None,
        *,
        attempted: Callable[[Candidate, bool], None] | None = None,
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.fallback = fallback  # the provider deployment; None when no provider is configured
        self.attempted = attempted  # told of every attempt and whether it failed (the fleet refreshes its view)

    def wait_limit_s(self, cand: Candidate) -> float:
        """How long a candidate may take to answer (non-streamed) or send its first chunk: the request timeout,
        or less for a tier that scales to zero and may be warming up (its overflow policy bounds that wait)."""
        if cand.max_wait_s is not None:
            return cand.max_wait_s
        limit = self.config.ingress.request_timeout_s
        tier = self.config.tiers.get(cand.name) if cand.kind == "tier" else None
        if tier is not None and tier.replicas.min == 0:
            return min(limit, tier.overflow.max_cold_wait_s)
        return limit

    async def dispatch(self, decision: Decision, request: Request, ticket: Ticket) -> Answer:
        """The first answer any candidate starts; APIError (with Retry-After) when none could."""
        reason = decision.reason
        failures: list[str] = []
        last: Result | None = None
        try:
            for i, cand in enumerate(decision.candidates):
                if i:
                    ticket.fell_back(_reason_label(last))
                    reason = f"fallback after {failures[-1]}"
                ticket.provider = LOCAL if cand.kind == "tier" else cand.name
                headers = {"x-tierserve-tier": cand.tier, "x-tierserve-provider": ticket.provider,
                           "x-tierserve-route-reason": _header(reason)}
                answer = await self._attempt(cand, request)
                failed = isinstance(answer, Result) and answer.failover
                if self.attempted is not None:
                    self.attempted(cand, failed)
                if isinstance(answer, Result):
                    if answer.failover:
                        last = answer
                        failures.append(f"{cand.kind} {cand.name} failed ({answer.status}: {_message(answer)[:160]})")
                        continue
                    ticket.finish(answer.status, answer.usage)
                    return Answer(headers, result=answer)
                first, rest = answer
                ticket.first()
                return Answer(headers, chunks=relay(first, rest, ticket))
        except BaseException:
            ticket.finish(500)  # a bug in a backend, or the client went away while waiting
            raise
        # Every candidate failed before answering: the last error, always with a Retry-After.
        status = last.status if last is not None and last.status in (429, 503) else 503
        ticket.finish(status)
        message = f"no target could serve the request: {'; '.join(failures) or 'no candidates'}"
        if decision.skipped:
            message += " (skipped: " + "; ".join(f"{who}: {why}" for who, why in decision.skipped) + ")"
        headers = {"retry-after": last.retry_after} if last is not None and last.retry_after else \
            retry_after(self.config.routing.unavailable_retry_after_s)
        raise APIError(status, message, headers=headers)

    def _backend(self, cand: Candidate) -> Backend:
        if cand.kind == "tier":
            return self.tiers[cand.name]
        if self.fallback is None:
            raise RuntimeError(f"provider {cand.name} routed to, but no provider deployment exists")
        return self.fallback

    async def _attempt(self, cand: Candidate, request: Request) -> Result | tuple[bytes, ItemStream]:
        """One candidate: a Result (answer or error) or, for a started stream, (first chunk, the rest)."""
        call = Call(request.endpoint, request.body, cand.tier, target=cand.name if cand.kind == "provider" else "",
                    prompt_tokens=request.prompt_tokens, trace=request.trace)
        backend = self._backend(cand)
        limit = self.wait_limit_s(cand)
        try:
            if not request.stream:
                return await asyncio.wait_for(backend.complete(call), limit)
            chunks = backend.stream(call)
            try:
                first = await asyncio.wait_for(chunks.__anext__(), limit)
            except TimeoutError:
                chunks.cancel()
                raise
        except TimeoutError:
            message = f"{cand.kind} {cand.name} did not answer within {limit:g}s (no replica ready, or overloaded)"
            headers = retry_after(self.config.routing.unavailable_retry_after_s)
            return Result.error(APIError(503, message, code="timeout", headers=headers))
        except StopAsyncIteration:
            return Result.error(APIError(502, f"{cand.kind} {cand.name} ended the stream without data"))
        except UNAVAILABLE as exc:
            return Result.error(APIError(503, f"{cand.kind} {cand.name} is unavailable: {type(exc).__name__}"))
        except RayTaskError:
            raise  # the backend's own code failed (a bug, since backends return their errors): a 500, not hidden
        except Exception as exc:
            # Transport trouble between the replicas (e.g. a new replica's gRPC server not yet answering
            # while the tier scales up): nothing has reached the client, so another candidate may answer.
            log.warning("%s %s: call failed before answering: %r", cand.kind, cand.name, exc)
            return Result.error(APIError(503, f"{cand.kind} {cand.name} is unavailable: {type(exc).__name__}"))
        if isinstance(first, Result):
            return first
        if not isinstance(first, bytes):  # a Usage before any data: the stream carried nothing for the client
            chunks.cancel()
            return Result.error(APIError(502, f"{cand.kind} {cand.name} ended the stream without data"))
        return first, chunks


async def relay(first: bytes, rest: ItemStream, ticket: Ticket) -> AsyncGenerator[bytes, None]:
    """Forward SSE bytes; the backend's closing Usage item goes to the ticket, not to the client."""
    status: Status = "stream_error"  # ended without the backend's usage: cut or failed mid-stream
    usage = Usage()
    try:
        yield first
        async for chunk in rest:
            if isinstance(chunk, Usage):
                usage, status = chunk, 200
            elif isinstance(chunk, bytes):
                yield chunk
    except (asyncio.CancelledError, GeneratorExit):  # cancelled while waiting, or closed while sending
        if status != 200:  # went away before the end
            status = 499
        raise
    finally:
        if status != 200:
            rest.cancel()  # aborts the engine request or the upstream call
        ticket.finish(status, usage)


def _message(result: Result) -> str:
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
