"""The session router of the tier deployments: the rendezvous choice on its own, then inside Ray Serve's request
router with fake replicas (no Ray cluster: the router's routing loop runs on this test's event loop)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import ray
from ray import serve
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.test_utils import FakeRunningReplica
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving.backends.replica_router import (
    DEFAULT_MAX_IMBALANCE,
    SessionAffinityRouter,
    rank_for_session,
    replica_weight,
    router_config,
    session_of,
)
from serving.wire.items import Call, ReplicaPick

T = TypeVar("T")
SESSIONS = [f"session-{i}" for i in range(1000)]


def preferred(session: str, replicas: list[str]) -> str:
    ranked = rank_for_session(session, [(r, 0) for r in replicas], max_imbalance=0)
    assert ranked is not None
    return ranked[0]


def placement(replicas: list[str]) -> dict[str, str]:
    return {s: preferred(s, replicas) for s in SESSIONS}


# -- the choice on its own ------------------------------------------------------------------------------------


def test_weight_is_a_fixed_hash_of_the_pair() -> None:
    # Pinned: a change here moves every session of a running fleet at the next deploy.
    assert replica_weight("conversation-1", "replica-a") == 7914435571078085029
    assert replica_weight("conversation-1", "replica-b") != replica_weight("conversation-1", "replica-a")
    # The highest weight wins.
    replicas = [f"replica-{i}" for i in range(5)]
    for session in SESSIONS[:20]:
        assert preferred(session, replicas) == max(replicas, key=lambda r: replica_weight(session, r))


def test_a_session_stays_on_one_replica() -> None:
    replicas = [("a", 3), ("b", 1), ("c", 2)]
    first = rank_for_session("s-1", replicas, max_imbalance=4)
    assert first is not None and sorted(first) == ["a", "b", "c"]
    for _ in range(200):
        assert rank_for_session("s-1", replicas, max_imbalance=4) == first
    # The order of the replicas given and their (balanced) queue lengths don't change it.
    assert rank_for_session("s-1", [("c", 0), ("a", 0), ("b", 0)], max_imbalance=4) == first


def test_sessions_spread_over_the_replicas() -> None:
    two = Counter(placement(["a", "b"]).values())
    assert all(350 <= two[r] <= 650 for r in ("a", "b")), two
    four = Counter(placement(["a", "b", "c", "d"]).values())
    assert all(150 <= four[r] <= 350 for r in ("a", "b", "c", "d")), four


def test_removing_a_replica_moves_only_its_sessions() -> None:
    before = placement(["a", "b", "c"])
    after = placement(["a", "c"])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == "b"}


def test_adding_a_replica_moves_about_its_share_and_only_to_it() -> None:
    before = placement(["a", "b", "c"])
    after = placement(["a", "b", "c", "d"])
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "d" for s in moved)
    assert 150 <= len(moved) <= 350, len(moved)  # about 1/4


def test_an_overloaded_replica_means_load_balancing() -> None:
    home = preferred("s-1", ["a", "b"])
    other = "b" if home == "a" else "a"
    assert rank_for_session("s-1", [(home, 9), (other, 5)], max_imbalance=4) == [home, other]  # 4 more: stays
    assert rank_for_session("s-1", [(home, 10), (other, 5)], max_imbalance=4) is None
    assert rank_for_session("s-1", [(home, 1), (other, 0)], max_imbalance=0) is None
    assert rank_for_session("s-1", [(home, 0), (other, 9)], max_imbalance=0) == [home, other]  # others' load


def test_no_session_or_no_replica_means_load_balancing() -> None:
    assert rank_for_session("", [("a", 0), ("b", 0)], max_imbalance=4) is None
    assert rank_for_session("s-1", [], max_imbalance=4) is None


def call(session: str = "") -> Call:
    return Call("chat", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, "fast", session=session)


def pending(*args: Any, session_id: str = "", internal_id: str | None = None) -> PendingRequest:
    """Made inside a running loop (its future belongs to the loop)."""
    metadata = RequestMetadata(
        request_id="req", internal_request_id=internal_id or uuid.uuid4().hex, session_id=session_id
    )
    return PendingRequest(args=list(args), kwargs={}, metadata=metadata)


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


def test_session_of_reads_the_call_then_the_handle_option() -> None:
    async def sessions() -> list[str]:
        return [
            session_of(pending(call("conv-1"))),
            session_of(pending(call(""), session_id="from-handle")),
            session_of(pending(call(""))),
            session_of(pending("not a call")),
            session_of(pending()),  # e.g. handle.probe.remote()
            session_of(None),
        ]

    assert run(sessions) == ["conv-1", "from-handle", "", "", "", ""]


# -- inside Serve's request router ----------------------------------------------------------------------------


def router(
    queue_lens: Sequence[int | None], cls: type[SessionAffinityRouter] = SessionAffinityRouter,
    cache: bool = True, **kwargs: Any
) -> tuple[SessionAffinityRouter, list[FakeRunningReplica]]:
    """A router over fake replicas (max_ongoing_requests 10) that answer probes with `queue_lens` (None: never
    answers), made as Serve makes it in a handle's process. Call inside a running loop; the cache is filled from
    the probes once `settle()` has run."""
    made = cls(
        deployment_id=DeploymentID(name="tierserve-fast"),
        handle_source=DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=cache,
    )
    made.initialize_state(**kwargs)
    replicas = [FakeRunningReplica(f"replica-{i}") for i in range(len(queue_lens))]
    for replica, queue_len in zip(replicas, queue_lens, strict=True):
        if queue_len is not None:
            replica.set_queue_len_response(queue_len)
    made.update_replicas(list(replicas))
    return made, replicas


async def settle() -> None:
    await asyncio.sleep(0.3)  # the probes update_replicas starts (unanswered ones time out at 0.1 s)


def expected(session: str, replicas: list[FakeRunningReplica], queue_lens: list[int], imbalance: int) -> str | None:
    ranked = rank_for_session(
        session, [(r.replica_id.unique_id, q) for r, q in zip(replicas, queue_lens, strict=True)],
        max_imbalance=imbalance,
    )
    return None if ranked is None else ranked[0]


def ids(ranks: list[list[RunningReplica]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_session_goes_to_the_replica_the_hash_picks() -> None:
    async def check() -> None:
        lens = [2, 0, 1]
        made, replicas = router(lens, max_imbalance=4)
        await settle()
        for session in SESSIONS[:50]:
            ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
            assert ids(ranks)[0] == [expected(session, replicas, lens, 4)]
            assert len(ranks) == 2 and len(ranks[1]) == 2  # then the power-of-two pair
        # The session given through the handle's options counts as well.
        ranks = await made.choose_replicas(made._replicas_list, pending(call(), session_id=SESSIONS[0]))
        assert ids(ranks)[0] == [expected(SESSIONS[0], replicas, lens, 4)]
        assert not ray.is_initialized()

    run(check)


def test_a_replica_goes_to_the_request_it_was_chosen_for() -> None:
    """Not to whichever request has waited longest (Serve's FIFO order), which may be another session's."""

    async def check() -> None:
        made, _ = router([])  # no replica yet: both requests wait
        first, second = pending(call(SESSIONS[0])), pending(call(SESSIONS[1]))
        waits = [asyncio.ensure_future(made._choose_replica_for_request(pr)) for pr in (first, second)]
        await asyncio.sleep(0)
        replica = FakeRunningReplica("replica-0")
        made._fulfill_next_pending_request(replica, second.metadata)  # what a routing task does for `second`
        assert await asyncio.wait_for(waits[1], 1) is replica
        assert not waits[0].done()
        waits[0].cancel()

    run(check)


def test_concurrent_sessions_each_get_their_own_replica() -> None:
    async def check() -> None:
        made, replicas = router([0, 0, 0, 0], max_imbalance=1000)
        await settle()
        requests = [pending(call(s)) for s in SESSIONS[:60]]
        chosen = await asyncio.wait_for(
            asyncio.gather(*(made._choose_replica_for_request(pr) for pr in requests)), 10
        )
        got = {s: r.replica_id.unique_id for s, r in zip(SESSIONS[:60], chosen, strict=True)}
        assert got == {s: expected(s, replicas, [0, 0, 0, 0], 1000) for s in SESSIONS[:60]}

    run(check)


def test_calls_sharing_a_request_id_are_all_routed() -> None:
    """Handle calls made while serving one ingress request share its id (the /metrics route calls each tier
    twice at once): Serve indexes only the first, and the others must not wait forever."""

    async def check() -> None:
        made, _ = router([0, 0])
        await settle()
        requests = [pending(internal_id="ingress-request") for _ in range(3)]
        requests += [pending(call(s), internal_id="ingress-request") for s in SESSIONS[:3]]
        chosen = await asyncio.wait_for(
            asyncio.gather(*(made._choose_replica_for_request(pr) for pr in requests)), 5
        )
        assert len(chosen) == 6

    run(check)


def test_without_a_session_the_request_is_load_balanced() -> None:
    async def check() -> None:
        made, replicas = router([0, 0, 0])
        await settle()
        seen: Counter[str] = Counter()
        for request in (pending(call()), pending("not a call"), pending(), None):
            for _ in range(50):
                ranks = await made.choose_replicas(made._replicas_list, request)
                assert len(ranks) == 1 and len(ranks[0]) == 2 and ranks[0][0] is not ranks[0][1]  # a random pair
                seen.update(r.replica_id.unique_id for r in ranks[0])
        assert set(seen) == {r.replica_id.unique_id for r in replicas}
        # Routed all the way: the less loaded of the pair.
        made, replicas = router([5, 0])
        await settle()
        for _ in range(10):
            chosen = await asyncio.wait_for(made._choose_replica_for_request(pending(call())), 5)
            assert chosen is replicas[1]

    run(check)


def test_an_overloaded_session_replica_is_load_balanced() -> None:
    async def check() -> None:
        made, replicas = router([0, 0], max_imbalance=2)
        await settle()
        session = SESSIONS[0]
        home = next(r for r in replicas if r.replica_id.unique_id == expected(session, replicas, [0, 0], 2))
        other = replicas[1] if home is replicas[0] else replicas[0]
        made.on_new_queue_len_info(home.replica_id, 3)
        made.on_new_queue_len_info(other.replica_id, 1)
        assert ids(await made.choose_replicas(made._replicas_list, pending(call(session))))[0] == [
            home.replica_id.unique_id
        ]  # 2 more: within max_imbalance
        made.on_new_queue_len_info(home.replica_id, 4)
        ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
        assert len(ranks) == 1 and {r.replica_id for r in ranks[0]} == {home.replica_id, other.replica_id}
        chosen = await asyncio.wait_for(made._choose_replica_for_request(pending(call(session))), 5)
        assert chosen is other

    run(check)


def test_a_full_session_replica_is_load_balanced() -> None:
    async def check() -> None:
        made, replicas = router([0, 0], max_imbalance=100)
        await settle()
        session = SESSIONS[0]
        home = next(r for r in replicas if r.replica_id.unique_id == expected(session, replicas, [0, 0], 100))
        other = replicas[1] if home is replicas[0] else replicas[0]
        home.set_queue_len_response(home.max_ongoing_requests)  # what it answers when asked again
        made.on_new_queue_len_info(home.replica_id, home.max_ongoing_requests)
        ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
        assert len(ranks) == 1  # the power-of-two pair only
        chosen = await asyncio.wait_for(made._choose_replica_for_request(pending(call(session))), 5)
        assert chosen is other

    run(check)


def test_a_silent_replica_sends_its_sessions_to_their_next_choice() -> None:
    async def check() -> None:
        made, replicas = router([0, 0, None])  # replica-2 never answers its probe
        await settle()
        names = [r.replica_id.unique_id for r in replicas]
        for session in SESSIONS[:40]:
            ranked = rank_for_session(session, [(n, 0) for n in names], max_imbalance=0)
            assert ranked is not None
            answering = [n for n in ranked if n != "replica-2"]
            ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
            assert ids(ranks)[0] == [answering[0]]

    run(check)


def test_initialize_state_takes_max_imbalance_and_sessions_only() -> None:
    async def check() -> None:
        made, _ = router([0])
        assert made._max_imbalance == DEFAULT_MAX_IMBALANCE
        made.initialize_state(max_imbalance=0)
        assert made._max_imbalance == 0
        with pytest.raises(ValueError):
            made.initialize_state(max_imbalance=-1)
        with pytest.raises(ValueError):
            made.initialize_state(max_imbalance=True)
        with pytest.raises(TypeError):
            made.initialize_state(imbalanced_threshold=3)

    run(check)


def test_router_config_names_the_router_and_its_kwargs() -> None:
    config = router_config(3)
    assert isinstance(config, RequestRouterConfig)
    assert config.request_router_class == "serving.backends.replica_router.SessionAffinityRouter"
    assert config.request_router_kwargs == {"max_imbalance": 3, "sessions": True}
    assert router_config(3, sessions=False).request_router_kwargs == {"max_imbalance": 3, "sessions": False}
    shipped: Any = config.get_request_router_class()  # what a handle's process gets (cloudpickled by value)
    assert shipped.__name__ == "SessionAffinityRouter" and issubclass(shipped, RequestRouter)

    async def shipped_routes_by_session() -> None:
        made, replicas = router([0, 0, 0], cls=shipped, **config.request_router_kwargs)
        assert made._max_imbalance == 3
        await settle()
        ranks = await made.choose_replicas(made._replicas_list, pending(call(SESSIONS[0])))
        assert ids(ranks)[0] == [expected(SESSIONS[0], replicas, [0, 0, 0], 3)]

    run(shipped_routes_by_session)
    assert router_config().request_router_kwargs == {"max_imbalance": DEFAULT_MAX_IMBALANCE, "sessions": True}
    with pytest.raises(ValueError):
        router_config(-1)

    class Tier:
        pass

    decorated: Any = serve.deployment(Tier)
    deployment = decorated.options(request_router_config=router_config(3))
    assert deployment._deployment_config.request_router_config == config
    assert not ray.is_initialized()


def test_a_replica_pick_reaches_its_replica_and_balance_ignores_sessions() -> None:
    """Telemetry reads every replica (one call per index, in id order), whichever policy the tier routes by."""

    async def check() -> None:
        for sessions in (True, False):
            made, replicas = router([9, 0, 0], sessions=sessions, max_imbalance=0)
            await settle()
            ordered = sorted(r.replica_id.unique_id for r in replicas)
            for index in range(6):
                ranks = await made.choose_replicas(made._replicas_list, pending(ReplicaPick(index)))
                assert ids(ranks) == [[ordered[index % 3]]]  # even the loaded one: it is asked, not loaded
        made, replicas = router([0, 0, 0], sessions=False)
        await settle()
        seen = set()
        for _ in range(40):  # one session, load balanced: it lands on more than one replica
            ranks = await made.choose_replicas(made._replicas_list, pending(call(SESSIONS[0])))
            assert len(ranks) == 1 and len(ranks[0]) == 2
            seen.update(r.replica_id.unique_id for r in ranks[0])
        assert len(seen) == 3

    run(check)


def test_without_serves_cache_the_router_counts_what_it_sent() -> None:
    """Serve's default (max_ongoing_requests not strict) keeps no queue-length cache: a burst of one session's
    requests is shed once this router has sent `max_imbalance` more to its replica than to the least loaded,
    before any replica has counted them."""

    async def check() -> None:
        made, replicas = router([0, 0], cache=False, max_imbalance=2)
        session = SESSIONS[0]
        home = expected(session, replicas, [0, 0], 2)
        chosen = []
        for _ in range(6):
            ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
            first = ranks[0] if len(ranks[0]) == 1 else [min(ranks[0], key=lambda r: made._in_flight.get(
                r.replica_id, 0))]
            made.on_send_request(first[0].replica_id)  # what Serve does once it has sent the request
            chosen.append(first[0].replica_id.unique_id)
        assert chosen[:3] == [home] * 3 and set(chosen[3:]) != {home}  # the fourth is one too many: shed
        for replica in replicas:
            while made._in_flight.get(replica.replica_id):
                made.decrement_queue_len_cache(replica.replica_id)  # the requests end
        ranks = await made.choose_replicas(made._replicas_list, pending(call(session)))
        assert ids(ranks)[0] == [home] and made._in_flight == {}

    run(check)
