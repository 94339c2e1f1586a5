"""Keep a conversation on one replica of a tier, so that replica's vLLM prefix cache is reused.

Each turn of a conversation resends its whole history. The replica that served the last turn still has that
history's KV blocks cached, so it prefills only the new part; any other replica prefills all of it again.
Ray Serve's default router (power of two choices) sends each request to a random replica.

A session's replica is chosen by rendezvous (highest-random-weight) hashing of the session over the replica ids.
Every ingress replica's router reaches the same answer without sharing any state. When a replica goes away, only
its sessions move, each to its next choice. A new replica takes an even share of the sessions, and only that
share moves. A request is load balanced by Ray's power-of-two-choices router instead when its session's replica
holds more than `max_imbalance` requests more than the least loaded replica, or is full, so that one busy
conversation cannot build a queue on one replica while another sits idle. Requests without a session (probes,
metrics) are load balanced too.

`SessionAffinityRouter` runs where the handle is, in the ingress's process, on the router's event loop. Serve
loads it there from `router_config()`'s class path and passes `request_router_kwargs` to `initialize_state`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ray.serve._private.common import RequestMetadata
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serving.wire.items import Call, ReplicaPick

# Serve counts a replica's ongoing requests, and vLLM runs up to max_num_seqs of them in one batch. A few more
# sequences in a batch slow every step a little. Moving a conversation costs a prefill of its whole history on
# a replica that has none of it cached. Replicas under the same load still differ by a few requests at random,
# so a threshold much below this would move sessions that don't need to move.
DEFAULT_MAX_IMBALANCE = 8


def replica_weight(session: str, replica: str) -> int:
    """The rendezvous weight of `replica` for `session`: a stable 64-bit hash of the pair, the same in every
    process and every run (Python's `hash` of a str is salted per process)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(replica.encode())
    digest.update(b"\0")
    digest.update(session.encode())
    return int.from_bytes(digest.digest(), "big")


def rank_for_session(session: str, replicas: Sequence[tuple[str, int]], *, max_imbalance: int) -> list[str] | None:
    """The replica ids of `replicas` (id, queue length) in the session's order of preference, best first, or None
    to load balance: no session, no replica, or the preferred replica's queue more than `max_imbalance` above
    the shortest."""
    if not session or not replicas:
        return None
    ranked = sorted(replicas, key=lambda r: (replica_weight(session, r[0]), r[0]), reverse=True)
    shortest = min(queue_len for _, queue_len in replicas)
    if ranked[0][1] - shortest > max_imbalance:
        return None
    return [replica_id for replica_id, _ in ranked]


def session_of(pending_request: PendingRequest | None) -> str:
    """The session a request belongs to: its Call's, else the handle's `options(session_id=...)`; "" if none."""
    if pending_request is None:
        return ""
    args = pending_request.args
    if args and isinstance(args[0], Call) and args[0].session:
        return args[0].session
    return pending_request.metadata.session_id or ""


def picked_replica(replicas: Sequence[RunningReplica], pending_request: PendingRequest | None) -> RunningReplica | None:
    """The replica a telemetry call's ReplicaPick names (the index-th by id, wrapping), or None for any other
    request."""
    args = pending_request.args if pending_request is not None else ()
    if not args or not isinstance(args[0], ReplicaPick) or not replicas:
        return None
    ordered = sorted(replicas, key=lambda r: r.replica_id.unique_id)
    return ordered[args[0].index % len(ordered)]


def _valid_max_imbalance(max_imbalance: Any) -> int:
    """`max_imbalance` if it is an int >= 0 (a bool is not), else ValueError."""
    if isinstance(max_imbalance, bool) or not isinstance(max_imbalance, int) or max_imbalance < 0:
        raise ValueError(f"max_imbalance must be an int >= 0, got {max_imbalance!r}")
    return max_imbalance


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """A request with a session goes to the session's replica while that one is not overloaded; anything else
    is routed as Ray's power-of-two-choices router does.

    Ray's power-of-two router fulfils requests in FIFO order: a replica chosen for one request goes to whichever
    request has waited longest. When routing tasks interleave (while they wait on queue-length probes), that would
    give one session's replica to another session. This router gives the replica to the request it was chosen
    for, as Ray's prefix-aware router does. It falls back to FIFO order only when that request is not found by its
    id. Handle calls made while serving one ingress request share that request's id (the `/metrics` route calls
    each tier twice at once), and Serve indexes only the first of them, so without the fallback the others would
    never be routed.
    """

    _max_imbalance: int = DEFAULT_MAX_IMBALANCE
    _sessions: bool = True
    _in_flight: dict[ReplicaID, int]

    def initialize_state(
        self, max_imbalance: int = DEFAULT_MAX_IMBALANCE, sessions: bool = True, **unknown: Any
    ) -> None:
        """Called by Serve with `request_router_kwargs`; `sessions=False` load balances every request (a tier's
        `replicas.routing: balance`) and still sends each ReplicaPick to its replica."""
        if unknown:
            raise TypeError(f"unknown request_router_kwargs for SessionAffinityRouter: {sorted(unknown)}")
        self._max_imbalance = _valid_max_imbalance(max_imbalance)
        self._sessions = bool(sessions)
        self._in_flight = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """The session's replica, then the power-of-two pair as the next rank (tried when the session's replica
        turns out full); only the pair when the request has no session or its replica is overloaded."""
        picked = picked_replica(candidate_replicas, pending_request)
        if picked is not None:
            return [[picked]]
        balanced: list[list[RunningReplica]] = await super().choose_replicas(candidate_replicas, pending_request)
        session = session_of(pending_request) if self._sessions else ""
        if not session or not candidate_replicas:
            return balanced
        queue_lens = await self.queue_lens(candidate_replicas)
        ranked = rank_for_session(
            session,
            [(replica.replica_id.unique_id, queue_len) for replica, queue_len in queue_lens],
            max_imbalance=self._max_imbalance,
        )
        if ranked is None:
            return balanced
        preferred, queue_len = next((r, q) for r, q in queue_lens if r.replica_id.unique_id == ranked[0])
        if queue_len >= preferred.max_ongoing_requests or preferred.replica_id not in self._replicas:
            return balanced
        return [[preferred], *balanced]

    async def queue_lens(self, replicas: Sequence[RunningReplica]) -> list[tuple[RunningReplica, int]]:
        """Each replica's queue length: from Serve's queue-length cache (kept by this router from what it sends
        and what replicas report), else by asking the replica, as Ray's routers do. A replica whose entry is
        missing, stale or full is asked; one that doesn't answer in time is left out."""
        if not self._use_replica_queue_len_cache:
            # Serve keeps no queue-length cache unless max_ongoing_requests is strict. Asking every replica on
            # every request would cost a round trip each, and a replica counts a request only once it has
            # arrived: a burst would all see the same short queue. What this router has sent and not yet seen
            # end is known at once.
            in_flight = self._in_flight
            return [(replica, in_flight.get(replica.replica_id, 0)) for replica in replicas]
        known: list[tuple[RunningReplica, int]] = []
        ask: list[RunningReplica] = []
        for replica in replicas:
            use_cache = self._use_replica_queue_len_cache
            cached = self._replica_queue_len_cache.get(replica.replica_id) if use_cache else None
            if cached is None or cached >= replica.max_ongoing_requests:
                ask.append(replica)
            else:
                known.append((replica, cached))
        if ask:
            answers = await self._probe_queue_lens(ask, 0)
            known.extend((replica, queue_len) for replica, queue_len in answers if queue_len is not None)
        return known

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1

    def decrement_queue_len_cache(self, replica_id: ReplicaID) -> None:
        """Serve calls this when a request it sent ends, however it ends (a stream: when it finishes)."""
        super().decrement_queue_len_cache(replica_id)
        left = self._in_flight.get(replica_id, 0) - 1
        if left > 0:
            self._in_flight[replica_id] = left
        else:
            self._in_flight.pop(replica_id, None)

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None
    ) -> None:
        # The request this replica was chosen for, matched by id; else the one that has waited longest.
        if self._get_pending_request_matching_internal_request_id(request_metadata) is not None:
            RequestRouter._fulfill_next_pending_request(self, replica, request_metadata)
        else:
            super()._fulfill_next_pending_request(replica, request_metadata)


def router_config(max_imbalance: int = DEFAULT_MAX_IMBALANCE, *, sessions: bool = True) -> RequestRouterConfig:
    """What a tier deployment's `.options(request_router_config=...)` takes: route by session (`sessions`), or
    load balance; telemetry calls go to the replica they pick either way."""
    # Serve takes the class or its import path (it keeps the path, and ships the class to the handles).
    fields: dict[str, Any] = {
        "request_router_class": f"{SessionAffinityRouter.__module__}.{SessionAffinityRouter.__qualname__}",
        "request_router_kwargs": {"max_imbalance": _valid_max_imbalance(max_imbalance), "sessions": sessions},
    }
    return RequestRouterConfig(**fields)
