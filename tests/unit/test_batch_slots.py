"""Batch slots (serving/gateway/slots.py) and the dispatcher holding a batch key's requests to them: at most the
tier's cap in flight, the rest waiting in arrival order until one ends, a 503 with Retry-After (or the next
candidate) when none frees in time, never a slot lost to a request that ended some other way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.config import ConfigError
from serving.gateway.dispatch import Answer, Dispatcher, Request
from serving.gateway.router import Candidate, Decision
from serving.gateway.slots import BatchSlots, SlotsFull
from serving.security.keys import KeySpec
from serving.wire.items import Result, Usage
from serving.wire.sse import DONE
from tests.support.gateway import HANG, TINY, FakeBackend, Parts, gateway_config, gateway_parts

TIER = Candidate("tier", "fast", "fast", "model:fast")
PEER = Candidate("provider", "peer", "fast", "model:fast->provider:peer")
ONLY_TIER = Decision("tier", "fast", "model:fast", (TIER,))
BOTH = Decision("tier", "fast", "model:fast", (TIER, PEER))
BODY = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
BATCH = Request("chat", BODY, stream=True, priority=10, batch=True)
INTERACTIVE = Request("chat", BODY, stream=True, priority=-10)


def test_at_most_the_cap_in_flight_and_the_rest_in_arrival_order() -> None:
    async def main() -> list[str]:
        gauges: list[tuple[str, int, int]] = []
        slots, order = BatchSlots(on_change=lambda *seen: gauges.append(seen)), []
        first, second = await slots.hold("t", 2, 1), await slots.hold("t", 2, 1)

        async def waiter(name: str) -> None:
            slot = await slots.hold("t", 2, 5)
            order.append(name)
            await asyncio.sleep(0.01)
            slot.release()

        tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0.01)
        assert order == [] and slots.waiting("t") == 3 and slots.in_flight["t"] == 2
        assert gauges[-1] == ("t", 2, 3)  # what the metrics show: in use, waiting
        first.release()
        first.release()  # idempotent: the second changes nothing
        await asyncio.sleep(0.005)  # less than a's hold: b and c still wait
        assert order == ["a"] and slots.in_flight["t"] == 2
        second.release()
        await asyncio.gather(*tasks)
        assert slots.in_flight["t"] == 0 and slots.waiting("t") == 0 and gauges[-1] == ("t", 0, 0)
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_a_waiter_past_its_deadline_gets_slots_full_and_leaves_no_slot_behind() -> None:
    async def main() -> None:
        slots = BatchSlots()
        held = await slots.hold("t", 1, 1)
        with pytest.raises(SlotsFull, match="tier t: its 1 batch slots stayed full"):
            await slots.hold("t", 1, 0.02)
        cancelled = asyncio.create_task(slots.hold("t", 1, 5))  # its caller goes away while waiting
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        held.release()
        assert slots.in_flight["t"] == 0  # neither the late nor the cancelled waiter kept a slot
        again = await asyncio.wait_for(slots.hold("t", 1, 1), 0.1)
        assert slots.in_flight["t"] == 1
        again.release()

    asyncio.run(main())


def test_the_cap_must_leave_engine_slots_free() -> None:
    tiers = {"fast": {"served_name": "tiny-fast", "model": TINY, "engine": {"max_num_seqs": 4},
                      "slots": {"batch_per_replica": 4}}}
    with pytest.raises(ConfigError, match=r"tiers\.fast.*batch_per_replica \(4\) must be below engine"):
        gateway_config(tiers=tiers)


# -- the dispatcher -------------------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    tiers = {"fast": {"served_name": "tiny-fast", "model": TINY, "engine": {"max_num_seqs": 2},
                      "slots": {"batch_per_replica": 1}}}
    # request_timeout_s: how long a batch request may wait for its slot here
    return gateway_parts(tmp_path, gateway_config(tiers=tiers, ingress={"request_timeout_s": 0.3}))


def streams(n: int, *steps: Any) -> list[list[Any]]:
    return [list(steps) for _ in range(n)]


def chunk(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


async def drain(answer: Answer) -> list[bytes]:
    """Every chunk the client gets, to the stream's end."""
    assert answer.chunks is not None
    return [c async for c in answer.chunks]


async def dispatch(dispatcher: Dispatcher, parts: Parts, decision: Decision, request: Request) -> Answer:
    _, key = parts.keys.create(KeySpec(agent="bot"))
    return await dispatcher.dispatch(decision, request, parts.accounting.open(key, "fast", "chat"))


def test_a_batch_stream_waits_for_the_one_before_it_to_end_and_interactive_never_waits(parts: Parts) -> None:
    async def main() -> None:
        tier = FakeBackend(streams(1, chunk("a"), HANG) + streams(2, chunk("b"), Usage(1, 1), DONE))
        dispatcher = Dispatcher(parts.config, {"fast": tier}, None, replicas=lambda _: 1)
        first = await dispatch(dispatcher, parts, ONLY_TIER, BATCH)  # holds the tier's one batch slot
        assert first.chunks is not None and await first.chunks.__anext__() == chunk("a")
        urgent = await asyncio.wait_for(dispatch(dispatcher, parts, ONLY_TIER, INTERACTIVE), 0.1)
        assert (await drain(urgent))[-1] == DONE
        second = asyncio.create_task(dispatch(dispatcher, parts, ONLY_TIER, BATCH))
        await asyncio.sleep(0.05)
        assert not second.done() and len(tier.calls) == 2  # waiting in the gateway, not at the tier
        await first.chunks.aclose()  # the first batch stream ends (its client hung up): its slot frees
        answer = await asyncio.wait_for(second, 0.2)
        assert (await drain(answer))[-1] == DONE
        # The route reason says which waited (the client's only view of the gateway's queue).
        assert answer.headers["x-tierserve-route-reason"].startswith("model:fast;waited 0.")
        assert answer.headers["x-tierserve-route-reason"].endswith("s for a batch slot")
        assert first.headers["x-tierserve-route-reason"] == urgent.headers["x-tierserve-route-reason"] == "model:fast"
        assert dispatcher.batch_slots.in_flight["fast"] == 0 and len(tier.calls) == 3

    asyncio.run(main())


def test_no_slot_in_time_is_a_503_with_retry_after_or_the_next_candidate(parts: Parts) -> None:
    async def main() -> None:
        tier = FakeBackend([[chunk("a"), HANG]])
        peer = FakeBackend([[chunk("peer"), Usage(1, 1), DONE]])
        dispatcher = Dispatcher(parts.config, {"fast": tier}, peer, replicas=lambda _: 1)
        held = await dispatch(dispatcher, parts, ONLY_TIER, BATCH)
        assert held.chunks is not None and await held.chunks.__anext__() == chunk("a")  # its response started
        with pytest.raises(Exception) as refused:
            await dispatch(dispatcher, parts, ONLY_TIER, BATCH)
        error: Any = refused.value
        assert error.status == 503 and error.headers["retry-after"] == str(parts.config.routing.retry_after_s)
        assert "tier fast: its 1 batch slots stayed full" in error.message
        answer = await dispatch(dispatcher, parts, BOTH, BATCH)
        assert answer.headers["x-tierserve-provider"] == "peer"
        assert answer.headers["x-tierserve-route-reason"].startswith("fallback after tier fast failed (503: tier fast")
        assert (await drain(answer))[0] == chunk("peer")
        assert len(tier.calls) == 1  # neither waiting request reached the tier
        await held.chunks.aclose()
        assert dispatcher.batch_slots.in_flight["fast"] == 0

    asyncio.run(main())


def test_a_batch_slot_frees_when_its_request_fails_over_or_answers(parts: Parts) -> None:
    async def main() -> None:
        from serving.wire.errors import APIError

        dead = Result.error(APIError(503, "engine is dead"))
        tier = FakeBackend([[dead], Result(200, b"{}", Usage(1, 1))])
        peer = FakeBackend([[chunk("peer"), Usage(1, 1), DONE]])
        dispatcher = Dispatcher(parts.config, {"fast": tier}, peer, replicas=lambda _: 1)
        answer = await dispatch(dispatcher, parts, BOTH, BATCH)
        assert (await drain(answer))[0] == chunk("peer")
        assert dispatcher.batch_slots.in_flight["fast"] == 0
        plain = Request("chat", {**BODY, "stream": False}, stream=False, batch=True)
        assert (await dispatch(dispatcher, parts, ONLY_TIER, plain)).result is not None
        assert dispatcher.batch_slots.in_flight["fast"] == 0

    asyncio.run(main())
