"""Stored responses for the Responses API (`store`, `previous_response_id`, GET/DELETE /v1/responses/{id}), in SQLite.

vLLM keeps stored responses in its engine's memory: another replica, or the same one after a restart, has never
heard of them. So the gateway keeps them itself and the tier only ever gets self-contained requests: the history
is inlined as `input` items, `previous_response_id` is removed and `store` is false.

Each stored response carries the whole conversation up to it (the input items the tier answered, history
inlined, followed by its output), so continuing from it is one lookup and does not depend on its ancestors
still being there (expired, deleted or dropped by the per-owner cap). Every lookup is by (owner, id): another
owner's response is exactly as absent as one that never existed.

Flow on the request path:

    sent = store.continue_request(owner, body)         # before routing: 404 for an unknown previous id
    answer = client_response(body, tier_response)      # what the client sees (and what GET returns)
    if wants_store(body):
        store.save(owner, sent, answer)

For a stream, feed every chunk to a `StreamRecorder` as it passes and save `client_response(body,
recorder.response)` when the stream ended with a response (its events go to the client unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import orjson

from serving.spend.statedb import open_state_db
from serving.wire.errors import APIError

DEFAULT_TTL_S = 30 * 86400.0  # OpenAI keeps stored responses for 30 days
DEFAULT_MAX_PER_OWNER = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    owner TEXT NOT NULL,             -- whose response it is (the API key's owner id)
    id TEXT NOT NULL,                -- the response's id ('resp_...')
    saved_at REAL NOT NULL,          -- clock() when saved: its expiry, and its age for the per-owner cap
    input BLOB NOT NULL,             -- JSON list: the input items the tier answered, history inlined
    response BLOB NOT NULL,          -- JSON object: the response as the client saw it (its `output` included)
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (saved_at);
CREATE INDEX IF NOT EXISTS responses_by_owner_age ON responses (owner, saved_at);
"""


def wants_store(body: dict[str, Any]) -> bool:
    """Whether the client asked for its response to be kept: `store` defaults to true, as in OpenAI's API.
    Validated here because the tier never sees the client's value (it always gets false)."""
    store = body.get("store")
    if store is None:
        return True
    if not isinstance(store, bool):
        raise APIError(400, "store: must be a boolean", param="store")
    return store


def as_items(value: Any) -> list[Any]:
    """A request's `input` in item-list form: a string is one user message, absent is no items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise APIError(400, "input: must be a string or a list of input items", param="input")


def client_response(body: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The tier's response object as the client must see it: the tier answered a request with `store` false and
    no `previous_response_id`; the client sent its own."""
    previous = body.get("previous_response_id")
    return {**response, "store": wants_store(body), "previous_response_id": previous}


class ResponseStore:
    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        ttl_s: float = DEFAULT_TTL_S,
        max_per_owner: int = DEFAULT_MAX_PER_OWNER,
    ) -> None:
        self.path = Path(path)
        self.clock = clock  # wall clock (unix seconds): expiry outlives restarts
        self.ttl_s = ttl_s
        self.max_per_owner = max_per_owner
        self.db, self.lock = open_state_db(self.path, SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _cutoff(self) -> float:
        """Rows saved at or before this are expired: invisible, and purged on the next save."""
        return self.clock() - self.ttl_s

    def _row(self, owner: str, response_id: str, columns: str) -> tuple[Any, ...] | None:
        with self.lock:
            row: tuple[Any, ...] | None = self.db.execute(
                f"SELECT {columns} FROM responses WHERE owner = ? AND id = ? AND saved_at > ?",
                (owner, response_id, self._cutoff()),
            ).fetchone()
        return row

    # -- the request path ---------------------------------------------------------------------------

    def continue_request(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request body for the tier: self-contained, and never stored by it."""
        wants_store(body)  # a malformed `store` fails before the tier is asked
        previous = body.get("previous_response_id")
        sent = {k: v for k, v in body.items() if k != "previous_response_id"}
        sent["store"] = False
        if previous is None:
            if "input" in body:
                as_items(body["input"])  # validate only: the tier gets the input as the client wrote it
            return sent
        if not isinstance(previous, str):
            raise APIError(400, "previous_response_id: must be a string", param="previous_response_id")
        new_items = as_items(body.get("input"))
        row = self._row(owner, previous, "input, response")
        if row is None:
            # The same answer for another owner's id as for one that never existed.
            raise APIError(
                404,
                f"previous_response_id: no response '{previous}' found",
                param="previous_response_id",
                code="not_found",
            )
        history: list[Any] = orjson.loads(row[0])
        output = orjson.loads(row[1]).get("output") or []
        # Only items: the previous request's `instructions` don't carry over (OpenAI's rule), this one's do.
        sent["input"] = [*history, *output, *new_items]
        return sent

    def save(self, owner: str, request_body: dict[str, Any], response: dict[str, Any]) -> None:
        """Keep a finished response under (owner, its id). `request_body` is what `continue_request` returned
        (the tier's request, history inlined); `response` is the client's view (`client_response`). Call it only
        when `wants_store` of the client's body; a response without a string id or a list output is refused."""
        response_id = response.get("id")
        if not isinstance(response_id, str) or not isinstance(response.get("output"), list):
            raise ValueError("not a Responses API response object (needs a string `id` and a list `output`)")
        items = orjson.dumps(as_items(request_body.get("input")))
        blob = orjson.dumps(response)
        now = self.clock()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO responses (owner, id, saved_at, input, response) VALUES (?, ?, ?, ?, ?)",
                    (owner, response_id, now, items, blob),
                )
                # Opportunistic upkeep, both on indexes: expired rows of everyone, this owner's beyond the cap.
                self.db.execute("DELETE FROM responses WHERE saved_at <= ?", (now - self.ttl_s,))
                self.db.execute(
                    "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses WHERE owner = ?"
                    " ORDER BY saved_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (owner, max(0, self.max_per_owner)),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # -- GET / DELETE /v1/responses/{id} ------------------------------------------------------------

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None (unknown, expired, deleted or another owner's)."""
        row = self._row(owner, response_id, "response")
        return None if row is None else dict(orjson.loads(row[0]))

    def input_items(self, owner: str, response_id: str) -> list[Any] | None:
        """The input items the response answered, history inlined (GET /v1/responses/{id}/input_items)."""
        row = self._row(owner, response_id, "input")
        return None if row is None else list(orjson.loads(row[0]))

    def delete(self, owner: str, response_id: str) -> bool:
        """Forget the response; False when there was nothing (visible) to delete."""
        with self.lock:
            cur = self.db.execute(
                "DELETE FROM responses WHERE owner = ? AND id = ? AND saved_at > ?",
                (owner, response_id, self._cutoff()),
            )
        return cur.rowcount > 0


# An SSE event ends at a blank line, whichever line ending the server uses.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete"})  # both carry a finished response
DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024


class StreamRecorder:
    """Watches a Responses API SSE stream as it passes and keeps the finished response from its last event.

    `feed` only reads the chunks (the caller forwards them unchanged); events may span chunks and a chunk may
    hold several. `response` is None until a `response.completed` (or `response.incomplete`) event was seen.
    """

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.response: dict[str, Any] | None = None
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._overflow = False  # the current event outgrew max_event_bytes: skipped up to its end

    def feed(self, chunk: bytes) -> None:
        # Search only the new bytes, plus the 3 before them that could start a split `\r\n\r\n`.
        start = max(0, len(self._buffer) - 3)
        self._buffer += chunk
        consumed = 0
        for end in _EVENT_END.finditer(self._buffer, start):
            if self._overflow:
                self._overflow = False
            else:
                self._event(bytes(self._buffer[consumed : end.start()]))
            consumed = end.end()
        del self._buffer[:consumed]
        if len(self._buffer) > self.max_event_bytes:
            # Not a stream worth holding in memory for; keep a tail in case it straddles the event's end.
            self._overflow = True
            del self._buffer[:-3]

    def _event(self, raw: bytes) -> None:
        name = ""
        data: list[bytes] = []
        for line in _LINE.split(raw):
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"event":
                name = value.decode(errors="replace")
            elif field == b"data":
                data.append(value)
        if not data or (name and name not in _FINAL_EVENTS):
            return  # the deltas: not parsed
        try:
            payload = orjson.loads(b"\n".join(data))
        except orjson.JSONDecodeError:
            return
        if (
            isinstance(payload, dict)
            and payload.get("type") in _FINAL_EVENTS
            and isinstance(payload.get("response"), dict)
        ):
            self.response = payload["response"]


class Conversations:
    """The Responses API's state around one dispatch: the continued request going in, the answer coming out
    (non-streamed or streamed) saved for the caller and shown to them as the API describes it."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    def continue_request(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.store.continue_request(owner, body)

    async def answered(self, owner: str, received: dict[str, Any], sent: dict[str, Any], data: bytes) -> bytes:
        """A whole 200 answer: saved when the client wants it stored; the body the client gets."""
        answer = client_response(received, orjson.loads(data))
        if wants_store(received):
            await asyncio.to_thread(self.store.save, owner, sent, answer)
        return orjson.dumps(answer)

    async def streamed(
        self, owner: str, received: dict[str, Any], sent: dict[str, Any], chunks: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[bytes, None]:
        """The stream unchanged; its completed response saved once it has passed."""
        recorder = StreamRecorder()
        async with contextlib.aclosing(chunks):  # closing this closes the relay: the backend stops at once
            async for chunk in chunks:
                recorder.feed(chunk)
                yield chunk
        if recorder.response is not None and wants_store(received):
            answer = client_response(received, recorder.response)
            await asyncio.to_thread(self.store.save, owner, sent, answer)
