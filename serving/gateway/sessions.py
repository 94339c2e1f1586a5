"""Which conversation a request belongs to: what the tiers' request router keeps on one replica, so the
next turn of an agent's conversation finds its prefix in that replica's cache.

An agent resends its whole conversation every turn; the conversation's opening (system prompt, first user
message) stays the same from turn to turn, so it names the session when the client sends no session header.
The caller's key is part of the name: two agents with the same opening are still two sessions.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from serving.config import Endpoint

SESSION_HEADER = "x-session-id"
_SESSION_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: a header value, a hash input
OPENING_CHARS = 4096  # of a completion's prompt: what a growing prompt keeps from turn to turn


def session_of(headers: Mapping[str, str], key_id: str, endpoint: Endpoint, body: dict[str, Any]) -> str:
    """The session's name ("" when the body gives nothing to go by). A malformed header is ignored, as one
    that was never sent: routing is a hint, never a reason to refuse."""
    given = headers.get(SESSION_HEADER)
    if given is not None and _SESSION_RE.match(given):
        return _digest(key_id, "header", given)
    opening = conversation_opening(endpoint, body)
    return _digest(key_id, endpoint, opening) if opening is not None else ""


def conversation_opening(endpoint: Endpoint, body: dict[str, Any]) -> Any:
    """What stays the same across a conversation's turns: its messages up to the first user message (with a
    separate system prompt), or the first characters of a prompt. None: nothing to go by."""
    if endpoint in ("chat", "messages"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), 0)
        return [body.get("system"), messages[: first_user + 1]]
    if endpoint == "responses":
        given = body.get("input")
        opening = given[:1] if isinstance(given, list) else given
        return [body.get("instructions"), opening] if opening else None
    if endpoint == "completion":
        prompt = body.get("prompt")
        return prompt[:OPENING_CHARS] if isinstance(prompt, str) and prompt else None
    return None


def _digest(key_id: str, kind: str, value: Any) -> str:
    data = orjson.dumps([key_id, kind, value], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=12).hexdigest()


class SessionTiers:
    """The tier each recent conversation's `auto` turns went to (least recently used forgotten first, and after
    `ttl_s`): the router keeps the next turn there, where its prefix is cached."""

    def __init__(self, max_sessions: int = 10_000, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self._tiers: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, session: str) -> str | None:
        found = self._tiers.get(session)
        if found is None:
            return None
        if self.clock() - found[1] >= self.ttl_s:
            del self._tiers[session]
            return None
        return found[0]

    def remember(self, session: str, tier: str) -> None:
        if not session:
            return
        self._tiers[session] = (tier, self.clock())
        self._tiers.move_to_end(session)
        while len(self._tiers) > self.max_sessions:
            self._tiers.popitem(last=False)
