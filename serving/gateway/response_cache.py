"""The response cache: deterministic answers (temperature 0, or a fixed seed) kept in the ingress and replayed
byte for byte, a stream as the same chunks.

An agent that retries a step, or a fleet of agents that ask one question, pays for the engine once. Entries are
keyed by the caller's cache scope (serving/security/isolation.py), the tier, the endpoint and the whole body:
no key sees an answer made for another team, and any field that changes the answer (the stream flag and its
options included) makes another entry. Only a tier's own complete answers are kept: an error, a cut stream
or a provider's answer is not. Bounded by entries, bytes and age; least recently used goes first.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from serving.config import Endpoint, ResponseCacheConfig
from serving.gateway.accounting import Ticket
from serving.gateway.dispatch import Answer
from serving.ops.metrics import LOCAL
from serving.wire.items import Result
from serving.wire.sse import has_error_event

CACHE_HEADER = "x-tierserve-cache"
CACHE_PROVIDER = "cache"  # the provider label of answers replayed from the cache (metrics, headers)
# Not the Responses API: it keeps state per response id, which a replay would reuse.
CACHEABLE_ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completion", "messages")
LookupResult = Literal["hit", "miss", "bypass"]


@dataclass(frozen=True, slots=True)
class Cached:
    """One answer: a whole JSON body, or a stream's chunks as they were sent."""

    body: bytes | None = None
    chunks: tuple[bytes, ...] | None = None
    stored_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.body) if self.body is not None else sum(map(len, self.chunks or ()))


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache says of one request: `result` None when the cache does not apply to it; `key` is where a
    fresh answer is stored (None: it is not stored)."""

    result: LookupResult | None = None
    key: str | None = None
    hit: Cached | None = None


def deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy decoding, or sampling from a fixed seed: the same body gets the same answer."""
    temperature, seed = body.get("temperature"), body.get("seed")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return greedy or (isinstance(seed, int) and not isinstance(seed, bool))


def entry_key(scope: str | None, tier: str, endpoint: str, body: Mapping[str, Any]) -> str:
    data = orjson.dumps([scope, tier, endpoint, body], option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(data).hexdigest()


def cache_directives(headers: Mapping[str, str]) -> set[str]:
    """The request's Cache-Control directives, lower-cased (`no-cache`: don't answer from the cache; `no-store`:
    don't keep the answer either)."""
    return {d.strip().split("=", 1)[0].lower() for d in headers.get("cache-control", "").split(",") if d.strip()}


class ResponseCache:
    def __init__(
        self, config: ResponseCacheConfig, *, clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.on_change = on_change  # (entries, bytes): the gauges
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, *, enabled: bool, endpoint: Endpoint, body: Mapping[str, Any], scope: str | None, tier: str,
        headers: Mapping[str, str],
    ) -> Lookup:
        """`enabled`: the tier and the key both opted in."""
        if not enabled or endpoint not in CACHEABLE_ENDPOINTS or not deterministic(body):
            return Lookup()
        directives = cache_directives(headers)
        key = None if "no-store" in directives else entry_key(scope, tier, endpoint, body)
        if directives & {"no-cache", "no-store"}:
            return Lookup("bypass", key)
        hit = self.get(key) if key is not None else None
        return Lookup("hit", key, hit) if hit is not None else Lookup("miss", key)

    def get(self, key: str) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.stored_at >= self.config.ttl_s:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, *, body: bytes | None = None, chunks: tuple[bytes, ...] | None = None) -> bool:
        """Keep an answer; False when it is larger than the whole cache may hold."""
        entry = Cached(body, chunks, self.clock())
        if entry.size > self.config.max_bytes:
            return False
        if key in self._entries:
            self._drop(key, notify=False)
        self._entries[key] = entry
        self.size += entry.size
        while len(self._entries) > self.config.max_entries or self.size > self.config.max_bytes:
            self._drop(next(iter(self._entries)), notify=False)
        self._changed()
        return True

    def _drop(self, key: str, *, notify: bool = True) -> None:
        self.size -= self._entries.pop(key).size
        if notify:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._entries), self.size)

    def answer(self, lookup: Lookup, tier: str, ticket: Ticket) -> Answer:
        """A hit, replayed: accounted as answered by the cache (no engine time, no tokens charged)."""
        hit = lookup.hit
        assert hit is not None
        ticket.provider = CACHE_PROVIDER
        ticket.first()
        ticket.finish(200)
        headers = {"x-tierserve-tier": tier, "x-tierserve-provider": CACHE_PROVIDER,
                   "x-tierserve-route-reason": "response cache hit", CACHE_HEADER: "hit"}
        if hit.chunks is not None:
            return Answer(headers, chunks=replayed(hit.chunks))
        return Answer(headers, result=Result(200, hit.body or b""))

    def keep(self, lookup: Lookup, answer: Answer) -> Answer:
        """A fresh answer, with the lookup's header; kept when it is the tier's own (a provider's answer to a
        tier's request is not the tier's answer)."""
        headers = {**answer.headers, CACHE_HEADER: lookup.result or "miss"}
        key = lookup.key if answer.headers.get("x-tierserve-provider") == LOCAL else None
        if answer.chunks is not None:
            return Answer(headers, chunks=self.recorded(key, answer.chunks) if key else answer.chunks)
        if key is not None and answer.result is not None and answer.result.status == 200:
            self.put(key, body=answer.result.body)
        return Answer(headers, result=answer.result)

    async def recorded(self, key: str, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """`chunks` passed on as they come, kept once the stream has ended whole and without an error event (a
        client that hangs up, a stream cut by a failure: nothing is kept)."""
        kept: list[bytes] | None = []
        size = 0
        async with contextlib.aclosing(chunks):  # our close (the client gone) reaches the relay at once
            async for chunk in chunks:
                if kept is not None:
                    size += len(chunk)
                    if size > self.config.max_bytes or has_error_event(chunk):
                        kept = None  # too large to keep, or failed: pass the rest on without keeping it
                    else:
                        kept.append(chunk)
                yield chunk
        if kept:
            self.put(key, chunks=tuple(kept))


async def replayed(chunks: tuple[bytes, ...]) -> AsyncGenerator[bytes, None]:
    for chunk in chunks:
        yield chunk
