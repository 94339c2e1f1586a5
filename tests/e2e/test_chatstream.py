"""tierserve's chat streams are bare vLLM's, chunk for chunk.

The `fast` tier and the session's bare vLLM upstream serve the same tiny model (seed 3). Whatever path a
stream takes through tierserve (tier replica, coalescing, usage capture, ingress relay), a client must see the
same chunks, fields, key order, roles, finish reasons and token counts as from vLLM; short streams included
(one that ended in its first batch used to break the ingress). Compared is each chunk's shape, not the text or
the number of chunks: with random weights the top logits are near ties, so a concurrent request in the same
engine batch (a readiness probe) can flip a greedy token on the CPU, and a busy replica gets two tokens in one
chunk (vLLM merges deltas its consumer has not taken yet, bare vLLM too). Runs of equal shapes count once.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_MODEL, auth

MESSAGES = [{"role": "user", "content": "write a function that adds two numbers"}]
BASE = {"messages": MESSAGES, "stream": True, "temperature": 0, "max_tokens": 8, "min_tokens": 8}
# Per server, not per generation: the response id, clock, served name and build fingerprint.
VOLATILE = ("id", "created", "model", "system_fingerprint")

CASES = {
    "plain, usage": {"stream_options": {"include_usage": True}},
    "plain, no usage": {},
    "one token": {"max_tokens": 1, "min_tokens": 0, "stream_options": {"include_usage": True}},
    "system message": {"messages": [{"role": "system", "content": "be brief"}, *MESSAGES]},
    "logprobs": {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    "two choices": {"n": 2, "temperature": 1, "seed": 5, "stream_options": {"include_usage": True}},
    "continuous usage": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "token ids": {"return_token_ids": True},
}


def chunks(client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    """Every SSE event: parsed JSON with the volatile fields dropped (key order kept), or the raw `[DONE]`."""
    events: list[Any] = []
    with client.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                events.append(data)
                continue
            events.append(shape({k: v for k, v in json.loads(data).items() if k not in VOLATILE}))
    return events


# Values kept as they are; every other string, number or list of numbers becomes its type (or length).
KEEP = {"object", "role", "finish_reason", "index", "prompt_tokens", "completion_tokens", "total_tokens"}


def shape(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):  # token ids, a token's bytes
            return "ints"
        shapes: list[Any] = []
        for item in (shape(v, key) for v in value):
            if not shapes or shapes[-1] != item or key == "top_logprobs":  # top_logprobs: exactly N
                shapes.append(item)
        return shapes
    if key in KEEP or value is None or isinstance(value, bool):
        return value
    return type(value).__name__


@pytest.mark.parametrize("case", list(CASES))
def test_chat_stream_matches_bare_vllm(app_url: str, api_key: str, upstream, case: str) -> None:
    upstream.wait(420)
    body = {**BASE, **CASES[case]}
    with httpx.Client(timeout=120) as client:
        ours = chunks(client, f"{app_url}/v1/chat/completions", {**body, "model": "fast"}, auth(api_key))
        bare = chunks(client, f"{upstream.url}/v1/chat/completions", {**body, "model": UPSTREAM_MODEL}, {})
    assert ours[-1] == "[DONE]" and len(ours) > 3
    if case == "continuous usage":
        ours, bare = running_counts_checked(ours, bare)
    # Choices of one response interleave as the engine happens to emit them; each choice's own chunks don't.
    # Serialized, so that key order counts too.
    ours_by, bare_by = by_choice(ours), by_choice(bare)
    assert list(ours_by) == list(bare_by)
    for index, group in ours_by.items():
        assert json.dumps(group) == json.dumps(bare_by[index]), (index, group, bare_by[index])


def by_choice(events: list[Any]) -> dict[Any, list[Any]]:
    """Chunk shapes grouped by their choice's index (None: no choice, e.g. usage), in order within each group,
    a run of equal shapes once."""
    groups: dict[Any, list[Any]] = {}
    for event in events:
        choices = event.get("choices") if isinstance(event, dict) else None
        group = groups.setdefault(choices[0]["index"] if choices else None, [])
        if not group or group[-1] != event:
            group.append(event)
    return groups


def running_counts_checked(ours: list[Any], bare: list[Any]) -> tuple[list[Any], list[Any]]:
    """Continuous usage: each content chunk's running token counts. A chunk carries two tokens when its
    consumer was busy (vLLM merges deltas, bare vLLM too), so a count may skip one; the counts must still
    strictly rise and end where bare vLLM's end, and each total must be prompt plus completion. Returns the
    events with those running counts as "int", for the shape comparison."""

    def counts(events: list[Any]) -> list[int]:
        return [e["usage"]["completion_tokens"] for e in events if isinstance(e, dict) and e.get("choices")]

    mine, theirs = counts(ours), counts(bare)
    assert mine and mine == sorted(set(mine)), mine  # strictly rising
    assert mine[-1] == theirs[-1], (mine, theirs)
    assert all(e["usage"]["total_tokens"] - e["usage"]["completion_tokens"] == e["usage"]["prompt_tokens"]
               for e in ours if isinstance(e, dict) and e.get("usage"))

    def blur(event: Any) -> Any:
        if not (isinstance(event, dict) and event.get("choices")):
            return event
        return {**event, "usage": {k: "int" if k in ("completion_tokens", "total_tokens") else v
                                   for k, v in event["usage"].items()}}

    return [blur(e) for e in ours], [blur(e) for e in bare]
