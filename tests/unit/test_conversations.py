"""Stored responses: continuing a conversation (history inlined for the tier), owners kept apart, expiry, the
per-owner cap, persistence across a restart, and the final response picked out of a passing SSE stream."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.gateway.conversations import ResponseStore, StreamRecorder, client_response, wants_store
from serving.wire.errors import APIError
from tests.support.clock import Clock

ALICE, BOB = "key-alice", "key-bob"


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def answer(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "id": f"msg_{text}", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def tier_response(rid: str, text: str, **kw: Any) -> dict[str, Any]:
    """What a tier answers: it was asked with store false and no previous id."""
    return {"id": rid, "object": "response", "status": "completed", "model": "small", "output": [answer(text)],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}, "store": False,
            "previous_response_id": None, **kw}


def turn(store: ResponseStore, owner: str, body: dict[str, Any], rid: str, text: str) -> dict[str, Any]:
    """One request through the gateway's flow; returns what the tier was sent."""
    sent = store.continue_request(owner, body)
    if wants_store(body):
        store.save(owner, sent, client_response(body, tier_response(rid, text)))
    return sent


def not_found(store: ResponseStore, owner: str, rid: str) -> APIError:
    with pytest.raises(APIError) as e:
        store.continue_request(owner, {"model": "small", "input": "hi", "previous_response_id": rid})
    return e.value


@pytest.fixture
def store(tmp_path: Path) -> ResponseStore:
    return ResponseStore(tmp_path / "responses.db", clock=Clock())


def test_without_previous_id_only_store_is_turned_off(store: ResponseStore) -> None:
    body = {"model": "small", "input": "hello", "instructions": "be brief", "store": True}
    assert store.continue_request(ALICE, body) == {**body, "store": False}
    assert body["store"] is True  # the client's body is not changed
    listed = {"model": "small", "input": [user("hello")], "previous_response_id": None}
    assert store.continue_request(ALICE, listed) == {"model": "small", "input": [user("hello")], "store": False}


@pytest.mark.parametrize("new_input", ["and then?", [user("and then?")]])
def test_continuing_inlines_the_history_before_the_new_input(store: ResponseStore, new_input: Any) -> None:
    turn(store, ALICE, {"model": "small", "input": "hello"}, "resp_1", "hi there")
    body = {"model": "small", "input": new_input, "previous_response_id": "resp_1", "temperature": 0}
    sent = store.continue_request(ALICE, body)
    assert sent == {"model": "small", "temperature": 0, "store": False,
                    "input": [user("hello"), answer("hi there"), user("and then?")]}
    assert "previous_response_id" not in sent
    # No new input at all: the history alone.
    sent = store.continue_request(ALICE, {"model": "small", "previous_response_id": "resp_1"})
    assert sent["input"] == [user("hello"), answer("hi there")]


def test_another_owners_response_is_exactly_as_absent_as_an_unknown_one(store: ResponseStore) -> None:
    turn(store, ALICE, {"model": "small", "input": "secret"}, "resp_a", "ok")
    foreign = not_found(store, BOB, "resp_a")
    assert (foreign.status, foreign.param, foreign.code) == (404, "previous_response_id", "not_found")
    assert foreign.message == "previous_response_id: no response 'resp_a' found"
    assert store.get(BOB, "resp_a") is None and store.delete(BOB, "resp_a") is False
    assert store.get(ALICE, "resp_a") is not None  # Bob's attempt deleted nothing
    assert store.delete(ALICE, "resp_a")
    assert not_found(store, BOB, "resp_a").body() == foreign.body()  # once it really is unknown: the same error


def test_a_three_turn_chain_carries_every_item_in_order(store: ResponseStore) -> None:
    turn(store, ALICE, {"model": "small", "input": "one"}, "resp_1", "1")
    sent = turn(store, ALICE, {"model": "small", "input": "two", "previous_response_id": "resp_1"}, "resp_2", "2")
    assert sent["input"] == [user("one"), answer("1"), user("two")]
    sent = turn(store, ALICE, {"model": "small", "input": [user("three")], "previous_response_id": "resp_2"},
                "resp_3", "3")
    assert sent["input"] == [user("one"), answer("1"), user("two"), answer("2"), user("three")]
    sent = store.continue_request(ALICE, {"model": "small", "input": "four", "previous_response_id": "resp_3"})
    assert sent["input"] == [user("one"), answer("1"), user("two"), answer("2"), user("three"), answer("3"),
                             user("four")]
    branch = store.continue_request(ALICE, {"input": "two'", "previous_response_id": "resp_1"})  # a fork at r1
    assert branch["input"] == [user("one"), answer("1"), user("two'")]
    # Each response holds its whole history: continuing from r3 survives r1 and r2 going.
    assert store.delete(ALICE, "resp_1") and store.delete(ALICE, "resp_2")
    assert store.continue_request(ALICE, {"input": "x", "previous_response_id": "resp_3"})["input"][0] == user("one")
    assert store.input_items(ALICE, "resp_3") == [user("one"), answer("1"), user("two"), answer("2"), user("three")]


def test_instructions_apply_only_to_the_request_that_gives_them(store: ResponseStore) -> None:
    turn(store, ALICE, {"model": "small", "input": "one", "instructions": "speak French"}, "resp_1", "un")
    sent = store.continue_request(ALICE, {"model": "small", "input": "two", "previous_response_id": "resp_1"})
    assert "instructions" not in sent
    assert not any(isinstance(i, dict) and i.get("role") in ("system", "developer") for i in sent["input"])
    sent = store.continue_request(ALICE, {"input": "two", "instructions": "German", "previous_response_id": "resp_1"})
    assert sent["instructions"] == "German"


def test_save_get_delete(store: ResponseStore) -> None:
    body = {"model": "small", "input": "one"}
    turn(store, ALICE, body, "resp_1", "1")
    body2 = {"model": "small", "input": "two", "previous_response_id": "resp_1"}
    turn(store, ALICE, body2, "resp_2", "2")
    got = store.get(ALICE, "resp_2")
    # What GET returns is the client's view: stored, continuing resp_1; the tier's answer said neither.
    assert got == {**tier_response("resp_2", "2"), "store": True, "previous_response_id": "resp_1"}
    assert store.get(ALICE, "resp_1") == {**tier_response("resp_1", "1"), "store": True}
    assert store.input_items(ALICE, "resp_2") == [user("one"), answer("1"), user("two")]
    assert store.delete(ALICE, "resp_2") is True
    assert store.get(ALICE, "resp_2") is None and store.input_items(ALICE, "resp_2") is None
    assert store.delete(ALICE, "resp_2") is False
    assert not_found(store, ALICE, "resp_2").status == 404


def test_store_false_keeps_nothing(store: ResponseStore) -> None:
    body = {"model": "small", "input": "one", "store": False}
    sent = turn(store, ALICE, body, "resp_1", "1")
    assert sent["store"] is False and store.get(ALICE, "resp_1") is None
    assert client_response(body, tier_response("resp_1", "1"))["store"] is False


def test_client_response_tells_the_clients_story_without_changing_the_tiers() -> None:
    tier = tier_response("resp_2", "2")
    seen = client_response({"input": "x", "previous_response_id": "resp_1"}, tier)
    assert (seen["store"], seen["previous_response_id"]) == (True, "resp_1")
    assert (tier["store"], tier["previous_response_id"]) == (False, None)
    assert client_response({"input": "x"}, tier)["previous_response_id"] is None


def test_responses_expire_after_the_ttl_and_are_purged(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.db", clock=clock, ttl_s=100)
    turn(store, ALICE, {"input": "old"}, "resp_old", "1")
    clock.t += 99
    assert store.get(ALICE, "resp_old") is not None
    clock.t += 1  # exactly ttl_s old: gone
    assert store.get(ALICE, "resp_old") is None and store.input_items(ALICE, "resp_old") is None
    assert not_found(store, ALICE, "resp_old").status == 404
    assert store.delete(ALICE, "resp_old") is False
    # Still in the file until a save purges it (anyone's save).
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*) FROM responses").fetchone() == (1,)
    turn(store, BOB, {"input": "new"}, "resp_new", "2")
    assert db.execute("SELECT id FROM responses").fetchall() == [("resp_new",)]


def test_each_owner_keeps_at_most_max_per_owner_newest_first(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.db", clock=clock, max_per_owner=2)
    turn(store, BOB, {"input": "b"}, "resp_b", "b")
    for i in range(4):
        turn(store, ALICE, {"input": str(i)}, f"resp_{i}", str(i))  # same clock: the insertion order decides
    assert [store.get(ALICE, f"resp_{i}") is not None for i in range(4)] == [False, False, True, True]
    assert store.get(BOB, "resp_b") is not None  # another owner's rows don't count against Alice
    clock.t += 1
    turn(store, ALICE, {"input": "x", "previous_response_id": "resp_2"}, "resp_4", "4")
    assert [store.get(ALICE, f"resp_{i}") is not None for i in range(5)] == [False, False, False, True, True]


def test_responses_outlive_a_gateway_restart(tmp_path: Path) -> None:
    clock = Clock()
    first = ResponseStore(tmp_path / "r.db", clock=clock)
    turn(first, ALICE, {"input": "one"}, "resp_1", "1")
    first.close()
    second = ResponseStore(tmp_path / "r.db", clock=clock)
    assert second.get(ALICE, "resp_1") == {**tier_response("resp_1", "1"), "store": True}
    sent = second.continue_request(ALICE, {"input": "two", "previous_response_id": "resp_1"})
    assert sent["input"] == [user("one"), answer("1"), user("two")]
    assert second.get(BOB, "resp_1") is None


def test_saves_and_reads_from_threads(store: ResponseStore) -> None:
    async def main() -> None:
        await asyncio.gather(*(asyncio.to_thread(turn, store, ALICE, {"input": str(i)}, f"resp_{i}", str(i))
                               for i in range(64)))
        got = await asyncio.gather(*(asyncio.to_thread(store.get, ALICE, f"resp_{i}") for i in range(64)))
        assert [g and g["id"] for g in got] == [f"resp_{i}" for i in range(64)]

    asyncio.run(main())


def test_wants_store_defaults_to_true() -> None:
    assert wants_store({}) is True
    assert wants_store({"store": None}) is True
    assert wants_store({"store": True}) is True
    assert wants_store({"store": False}) is False
    with pytest.raises(APIError) as e:
        wants_store({"store": "false"})  # the tier always gets false, so it can't reject this for us
    assert (e.value.status, e.value.param) == (400, "store")


@pytest.mark.parametrize("previous", [None, "resp_1"])
@pytest.mark.parametrize("bad", [{"role": "user"}, 3, True])
def test_input_must_be_a_string_or_a_list(store: ResponseStore, previous: str | None, bad: Any) -> None:
    turn(store, ALICE, {"input": "one"}, "resp_1", "1")
    with pytest.raises(APIError) as e:
        store.continue_request(ALICE, {"input": bad, "previous_response_id": previous})
    assert (e.value.status, e.value.param) == (400, "input")


def test_malformed_previous_id_and_store_are_400(store: ResponseStore) -> None:
    with pytest.raises(APIError) as e:
        store.continue_request(ALICE, {"input": "x", "previous_response_id": 7})
    assert (e.value.status, e.value.param) == (400, "previous_response_id")
    with pytest.raises(APIError) as e:
        store.continue_request(ALICE, {"input": "x", "store": 1})
    assert (e.value.status, e.value.param) == (400, "store")


def test_save_refuses_what_is_not_a_response(store: ResponseStore) -> None:
    with pytest.raises(ValueError):
        store.save(ALICE, {"input": "x"}, {"object": "response", "output": []})
    with pytest.raises(ValueError):
        store.save(ALICE, {"input": "x"}, {"id": "resp_1", "error": {"message": "boom"}})


# -- the stream recorder ----------------------------------------------------------------------------


def sse(event: str, payload: dict[str, Any], newline: bytes = b"\n") -> bytes:
    return b"event: " + event.encode() + newline + b"data: " + orjson.dumps(payload) + newline + newline


FINAL = {**tier_response("resp_9", "héllo\n\nworld"), "output": [answer("héllo\n\nworld: {\"a\": 1}")]}


def stream(newline: bytes = b"\n", final: str = "response.completed") -> bytes:
    created = {**FINAL, "status": "in_progress", "output": []}
    return b"".join([
        sse("response.created", {"type": "response.created", "sequence_number": 0, "response": created}, newline),
        sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hé"}, newline),
        sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "\n\n"}, newline),
        sse(final, {"type": final, "sequence_number": 3, "response": FINAL}, newline),
    ])


def recorded(*chunks: bytes) -> dict[str, Any] | None:
    recorder = StreamRecorder()
    for chunk in chunks:
        recorder.feed(chunk)
    return recorder.response


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_recorder_finds_the_final_response_however_the_stream_is_cut(newline: bytes) -> None:
    data = stream(newline)
    assert recorded(data) == FINAL  # all events in one chunk
    for i in range(len(data) + 1):  # split at every byte boundary
        assert recorded(data[:i], data[i:]) == FINAL, i
    assert recorded(*(data[i : i + 1] for i in range(len(data)))) == FINAL  # a byte at a time


def test_recorder_without_a_final_event_has_nothing() -> None:
    data = stream()
    cut = data[: data.index(b"event: response.completed")]
    assert recorded(cut) is None  # response.created is not a finished response
    assert recorded(data[:-1]) is None  # the last event never ended
    assert recorded(b"data: [DONE]\n\n", b"event: error\ndata: {\"type\": \"error\"}\n\n") is None
    assert recorded(b"data: not json\n\n") is None


def test_recorder_takes_an_incomplete_response_and_events_without_a_name() -> None:
    assert recorded(stream(final="response.incomplete")) == FINAL
    nameless = b"data: " + orjson.dumps({"type": "response.completed", "response": FINAL}) + b"\n\n"
    assert recorded(nameless) == FINAL


def test_recorder_skips_an_event_too_big_to_hold_and_carries_on() -> None:
    recorder = StreamRecorder(max_event_bytes=100)
    recorder.feed(sse("response.output_text.delta", {"type": "x", "delta": "y" * 500})[:300])
    recorder.feed(b"y" * 300 + b"\"}\n\n")
    assert recorder.response is None
    small = {"id": "resp_1", "output": []}
    recorder.feed(sse("response.completed", {"type": "response.completed", "response": small}))
    assert recorder.response == small
