"""Who may share cached work: the scope of a key's cached prompts (vLLM's prefix cache) and answers (the
response cache).

A shared prefix cache is a timing side channel: a request whose prompt begins like another agent's answers
faster, so an agent can test whether another team sent a given document or system prompt. vLLM keys its cached
blocks by `cache_salt` as well as by tokens; tierserve sets the salt from the key's scope and drops the
client's, so a client cannot pick another team's salt. The salt is a digest: a team's name never reaches the
engine's logs or another process.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from serving.security.keys import KeyRecord

Isolation = Literal["team", "key", "shared"]


def cache_scope(isolation: Isolation, key: KeyRecord) -> str | None:
    """The scope `key`'s cached work belongs to; None: shared by everyone."""
    if isolation == "shared":
        return None
    if isolation == "team" and key.team is not None:
        name = f"team:{key.team}"
    else:
        name = f"key:{key.id}"  # a key without a team is a team of its own
    return hashlib.sha256(name.encode()).hexdigest()[:32]
