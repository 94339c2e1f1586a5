"""The dispatcher: tries a routing decision's candidates in order until one starts an answer.

A stream's first chunk is awaited before anything is sent to the client, so an early failure becomes a real
HTTP status or a fail-over to the next candidate; once the first byte has gone, nothing is retried (Envoy's
rule) and a later failure ends the stream with an SSE error event. Every request ends in exactly one
`Ticket.finish`, whichever way it ends.

A tier whose replica died is ejected (serving/gateway/ejection.py): failures that say a replica or its engine is
gone feed the ejector, a tier's wait for its first byte ends the moment the tier is ejected (the request then
goes to the next candidate, exactly once each), and a first byte that is late asks the fleet whether the tier
still has a running replica at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import orjson
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serving.config import AppConfig, Endpoint
from serving.gateway.accounting import Status, Ticket
from serving.gateway.ejection import ENGINE_DIED, REPLICA_DIED, REPLICA_UNAVAILABLE, Ejector, TierEjected
from serving.gateway.router import Candidate, Decision
from serving.gateway.slots import BatchSlots, Slot, SlotsFull
from serving.ops.metrics import LOCAL
from serving.wire.backend import Backend, ItemStream
from serving.wire.errors import ENGINE_DEAD, APIError, protocol_of, render_sse, retry_after
from serving.wire.items import Call, Result, Usage

log = logging.getLogger(__name__)

# The replica died mid-call, or its queue is full: nothing reached the client, another candidate may answer.
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Request:
    """What the dispatcher sends, whichever candidate serves it."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    prompt_tokens: int = 0  # the router's estimate: what a provider stream cut before its usage is charged
    trace: dict[str, str] | None = None
    priority: int = 0  # vLLM's request priority, from the caller's key
    batch: bool = False  # a batch key's request: held to its tier's batch slots
    cache_salt: str | None = None  # vLLM's prefix-cache salt: the key's cache scope (a tier's engine only)
    session: str = ""  # the conversation: the tier's request router keeps it on one replica


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
        ejector: Ejector | None = None,
        late_first_byte: Callable[[str], None] | None = None,
        replicas: Callable[[str], int | None] | None = None,
        batch_slots: BatchSlots | None = None,
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.fallback = fallback  # the provider deployment; None when no provider is configured
        self.attempted = attempted  # told of every attempt and whether it failed (the fleet refreshes its view)
        self.ejector = ejector if config.routing.ejection.enabled else None
        self.late_first_byte = late_first_byte  # a tier's first byte is late: is a replica still running?
        self.replicas = replicas  # a tier's running replicas, as the fleet last read them
        self.batch_slots = batch_slots or BatchSlots()

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
                slot = await self._batch_slot(cand, request)
                waited = slot.queued_s if isinstance(slot, Slot) and slot.queued_s is not None else 0.0
                if waited:
                    reason += f";waited {waited:.1f}s for a batch slot"
                headers = {"x-tierserve-tier": cand.tier, "x-tierserve-provider": ticket.provider,
                           "x-tierserve-route-reason": _header(reason)}
                if isinstance(slot, Result):
                    answer: Result | tuple[bytes, ItemStream] = slot
                    slot = None
                else:
                    try:
                        answer = await self._attempt(cand, request, waited)
                    except BaseException:
                        if slot is not None:
                            slot.release()
                        raise
                    if slot is not None and isinstance(answer, Result):
                        slot.release()
                failed = isinstance(answer, Result) and answer.failover
                if self.attempted is not None:
                    self.attempted(cand, failed)
                if isinstance(answer, Result):
                    if answer.failover:
                        last = answer
                        failures.append(f"{cand.kind} {cand.name} failed ({answer.status}: {_message(answer)[:160]})")
                        continue
                    ticket.finish(answer.status, answer.usage)
                    if answer.replica:
                        headers["x-tierserve-replica"] = answer.replica
                    return Answer(headers, result=answer)
                first, rest = answer
                ticket.first()
                return Answer(headers, chunks=relay(first, rest, ticket, partial(self._broke, cand, request),
                                                    ended=slot.release if slot is not None else None))
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

    async def _batch_slot(self, cand: Candidate, request: Request) -> Slot | Result | None:
        """A batch slot of the tier (saying how long it waited), the 503 when none freed in time, or None when
        the request is not held to one."""
        cap = self.config.tiers[cand.name].slots.batch_per_replica if cand.kind == "tier" else None
        if cap is None or not request.batch:
            return None
        replicas = (self.replicas(cand.name) if self.replicas is not None else None) or 1
        try:
            return await self.batch_slots.hold(cand.name, cap * replicas, self.wait_limit_s(cand))
        except SlotsFull as exc:
            headers = retry_after(self.config.routing.retry_after_s)
            return Result.error(APIError(503, str(exc), code="batch_slots_full", headers=headers))

    async def _attempt(
        self, cand: Candidate, request: Request, waited_s: float = 0.0
    ) -> Result | tuple[bytes, ItemStream]:
        """One candidate: a Result (answer or error) or, for a started stream, (first chunk, the rest)."""
        answer = await self._attempt_once(cand, request, waited_s)
        if cand.kind == "tier" and self.ejector is not None:
            cause = _ejection_cause(answer)
            if cause is None:
                self.ejector.succeeded(cand.name)
            elif cause:
                self.ejector.failed(cand.name, cause)
        return answer

    async def _attempt_once(
        self, cand: Candidate, request: Request, waited_s: float
    ) -> Result | tuple[bytes, ItemStream]:
        call = Call(request.endpoint, request.body, cand.tier, target=cand.name if cand.kind == "provider" else "",
                    prompt_tokens=request.prompt_tokens, trace=request.trace, priority=request.priority,
                    cache_salt=request.cache_salt, session=request.session)
        backend = self._backend(cand)
        limit = max(0.001, self.wait_limit_s(cand) - waited_s)  # a wait for a batch slot counts against it
        try:
            if not request.stream:
                return await self._first(cand, backend.complete(call), limit)
            chunks = backend.stream(call)
            try:
                first = await self._first(cand, chunks.__anext__(), limit)
            except (TimeoutError, TierEjected):
                chunks.cancel()
                raise
        except TierEjected as exc:
            headers = retry_after(self.config.routing.unavailable_retry_after_s)
            return Result.error(APIError(503, str(exc), code="tier_ejected", headers=headers))
        except TimeoutError:
            message = f"{cand.kind} {cand.name} did not answer within {limit:g}s (no replica ready, or overloaded)"
            headers = retry_after(self.config.routing.unavailable_retry_after_s)
            return Result.error(APIError(503, message, code="timeout", headers=headers))
        except StopAsyncIteration:
            return Result.error(APIError(502, f"{cand.kind} {cand.name} ended the stream without data"))
        except UNAVAILABLE as exc:
            return Result.error(APIError(503, f"{cand.kind} {cand.name} is unavailable: {type(exc).__name__}",
                                         code=_unavailable_code(exc, cand)))
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


    def _broke(self, cand: Candidate, request: Request, exc: Exception) -> bytes:
        """A started stream whose backend failed (its replica died mid-stream): the error event that ends it,
        in the stream's protocol. A dead replica counts towards ejecting its tier."""
        log.warning("%s %s: stream broke after its first byte: %r", cand.kind, cand.name, exc)
        gone = isinstance(exc, UNAVAILABLE) and not isinstance(exc, BackPressureError)
        code = _unavailable_code(exc, cand) if gone else "stream_error"
        cause = _CAUSE_OF_CODE.get(code or "")
        if cause is not None and cand.kind == "tier" and self.ejector is not None:
            self.ejector.failed(cand.name, cause)
        if self.attempted is not None:
            self.attempted(cand, True)
        message = f"{cand.kind} {cand.name} failed mid-stream: {type(exc).__name__}"
        return render_sse(APIError(502, message, code=code), protocol_of(request.endpoint))

    async def _first(self, cand: Candidate, work: Awaitable[T], limit: float) -> T:
        """`work` (an answer, or a stream's first item) within `limit`; for a tier, TierEjected as soon as the
        tier is ejected, and a word to the fleet once the first byte is late."""
        if cand.kind != "tier" or self.ejector is None:
            return await asyncio.wait_for(work, limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        task = asyncio.ensure_future(work)
        woken = asyncio.ensure_future(self.ejector.wakeup(cand.name).wait())
        try:
            check_at = self.config.routing.ejection.first_byte_check_s
            done, _ = await asyncio.wait({task, woken}, timeout=min(check_at, limit),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done and self.late_first_byte is not None:
                self.late_first_byte(cand.name)
            if not done:
                done, _ = await asyncio.wait({task, woken}, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if woken in done:
                raise TierEjected(cand.name, self.ejector.reason(cand.name) or "ejected")
            raise TimeoutError
        finally:
            woken.cancel()
            if not task.done():
                task.cancel()  # a handle call cancels its replica's work (HandleBackend)
                with contextlib.suppress(BaseException):
                    await task


def _ejection_cause(answer: Result | tuple[bytes, ItemStream]) -> str | None:
    """Why a tier's attempt says a replica or its engine is gone: a cause for the ejector, "" for a failure
    that says nothing about the replica (overload, a bad request, a timeout), None for an answer."""
    if not isinstance(answer, Result) or answer.status < 500:
        return None  # an answer, or the replica's own refusal: it is alive
    return _CAUSE_OF_CODE.get(_code(answer), "")


def _unavailable_code(exc: BaseException, cand: Candidate) -> str | None:
    """A dead actor is a replica that died; a full queue says nothing about the replicas' health."""
    if isinstance(exc, BackPressureError):
        return "backpressure"
    if cand.kind != "tier":
        return None
    return "replica_died" if isinstance(exc, RayActorError) else "replica_unavailable"


_CAUSE_OF_CODE = {"replica_died": REPLICA_DIED, "replica_unavailable": REPLICA_UNAVAILABLE,
                  ENGINE_DEAD: ENGINE_DIED}


def _code(result: Result) -> str:
    try:
        return str(orjson.loads(result.body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


async def relay(
    first: bytes, rest: ItemStream, ticket: Ticket, broke: Callable[[Exception], bytes],
    ended: Callable[[], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Forward SSE bytes; the backend's closing Usage item goes to the ticket, not to the client. A backend that
    fails after the first byte (backends report their own errors in-stream; this is one that could not, e.g. a
    replica that died) ends the stream with the error event `broke` renders, never a cut connection."""
    status: Status = "stream_error"  # ended without the backend's usage: cut or failed mid-stream
    usage = Usage()
    try:
        yield first
        try:
            async for chunk in rest:
                if isinstance(chunk, Usage):
                    usage, status = chunk, 200
                elif isinstance(chunk, bytes):
                    yield chunk
        except Exception as exc:  # whatever it was, the client gets an ending, not a cut connection
            yield broke(exc)
    except (asyncio.CancelledError, GeneratorExit):  # cancelled while waiting, or closed while sending
        if status != 200:  # went away before the end
            status = 499
        raise
    finally:
        if status != 200:
            rest.cancel()  # aborts the engine request or the upstream call
        if ended is not None:
            ended()
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
