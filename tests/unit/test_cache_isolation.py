"""Whose cached work a request may share: the key's cache scope (serving/security/isolation.py) as vLLM's
`cache_salt` in place of the client's, and the session a request belongs to (serving/gateway/sessions.py), both
from admission to the backend's Call; and `auto` keeping a session on its tier. The engine's side (prefix-cache
hits per team) is tested end to end in tests/e2e/test_response_cache_e2e.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from serving.cli import main
from serving.gateway.admission import Admission, Admitted
from serving.gateway.conversations import Conversations, ResponseStore
from serving.gateway.dispatch import Dispatcher, Request
from serving.gateway.router import Candidate, Decision, Router
from serving.gateway.sessions import SESSION_HEADER, conversation_opening, session_of
from serving.security.isolation import cache_scope
from serving.security.keys import KeySpec, KeyStore, KeyStoreError
from serving.wire.items import Result
from tests.support.gateway import FakeBackend, gateway_config, gateway_parts, http_request
from tests.unit.test_admission import admit_with, body


def test_scopes_per_team_key_or_shared(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.json")
    _, a1 = keys.create(KeySpec(agent="a1", team="alpha"))
    _, a2 = keys.create(KeySpec(agent="a2", team="alpha"))
    _, b = keys.create(KeySpec(agent="b", team="beta"))
    _, loner = keys.create(KeySpec(agent="loner"))
    team = {k.agent: cache_scope("team", k) for k in (a1, a2, b, loner)}
    assert team["a1"] == team["a2"] and len(set(team.values())) == 3  # a key without a team is its own
    assert "alpha" not in (team["a1"] or "")  # a digest: the team's name never reaches the engine
    per_key = {cache_scope("key", k) for k in (a1, a2, b, loner)}
    assert len(per_key) == 4 and team["loner"] in per_key
    assert {cache_scope("shared", k) for k in (a1, b)} == {None}


def test_a_bad_team_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="team name"):
        KeyStore(tmp_path / "keys.json").create(KeySpec(agent="a", team="no spaces"))
    with pytest.raises(ValueError, match="isolation"):
        gateway_config(cache={"isolation": "per-agent"})


def test_cli_creates_a_key_with_a_team_and_the_response_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys.json"
    monkeypatch.setenv("TIERSERVE_KEYS_FILE", str(keys_file))
    base = ["keys", "--config", str(tmp_path / "none.yaml"), "--state-dir", str(tmp_path / "state")]
    assert main([*base, "create", "--agent", "doc-writer", "--team", "docs", "--response-cache"]) == 0
    plaintext = capsys.readouterr().out.strip()
    key = KeyStore(keys_file).authenticate(f"Bearer {plaintext}")
    assert (key.team, key.response_cache) == ("docs", True)
    assert main([*base, "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert "TEAM" in header.split() and "docs" in row.split()


def test_admission_drops_the_clients_salt_and_names_scope_and_session(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path)
    plaintext, key = parts.keys.create(KeySpec(agent="bot", team="alpha"))
    auth = {"authorization": f"Bearer {plaintext}"}
    admitted, _ = admit_with(parts, body(cache_salt="beta-s-salt"), auth)
    assert "cache_salt" not in admitted.body and admitted.received["cache_salt"] == "beta-s-salt"
    assert admitted.scope == cache_scope("team", key)
    again, _ = admit_with(parts, body(cache_salt="other"), auth)
    assert again.session == admitted.session != ""  # the same conversation's opening: the same session
    pinned, _ = admit_with(parts, body(), {**auth, SESSION_HEADER: "task-42"})
    assert pinned.session not in ("", admitted.session)


def test_a_responses_request_loses_the_clients_salt_too(tmp_path: Path) -> None:
    """The Responses API's body is rebuilt (its stored conversation inlined): the client's salt stays dropped."""
    parts = gateway_parts(tmp_path)
    plaintext, _ = parts.keys.create(KeySpec(agent="bot", team="alpha"))
    store = Conversations(ResponseStore(tmp_path / "responses.db"))
    admission = Admission(parts.config, parts.keys, parts.limiter, parts.accounting, store)
    raw = orjson.dumps({"model": "fast", "input": "hi", "cache_salt": "beta-s-salt"})
    admitted = asyncio.run(admission.admit(http_request(raw, {"authorization": f"Bearer {plaintext}"}),
                                           "responses", Router(parts.config).route))
    assert "cache_salt" not in admitted.body and admitted.body["input"] == "hi"


def test_sessions_follow_the_conversations_opening_and_the_key() -> None:
    turn1 = {"messages": [{"role": "system", "content": "you code"}, {"role": "user", "content": "fix a.py"}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "done"},
                          {"role": "user", "content": "now b.py"}]}
    other = {"messages": [{"role": "system", "content": "you code"}, {"role": "user", "content": "fix c.py"}]}
    s1 = session_of({}, "k1", "chat", turn1)
    assert s1 == session_of({}, "k1", "chat", turn2)  # the next turn of one conversation
    assert s1 != session_of({}, "k1", "chat", other) and s1 != session_of({}, "k2", "chat", turn1)
    header = session_of({SESSION_HEADER: "abc"}, "k1", "chat", turn1)
    assert header == session_of({SESSION_HEADER: "abc"}, "k1", "chat", other) != s1
    assert session_of({SESSION_HEADER: "abc"}, "k2", "chat", turn1) != header  # another key's "abc"
    assert session_of({SESSION_HEADER: "has space"}, "k1", "chat", turn1) == s1  # malformed: as if not sent
    assert session_of({}, "k1", "chat", {"messages": []}) == ""
    grows = "x" * 5000
    grown = session_of({}, "k", "completion", {"prompt": grows})
    assert grown != "" and grown == session_of({}, "k", "completion", {"prompt": grows + "more"})
    assert conversation_opening("messages", {"system": "s", "messages": [{"role": "user", "content": "q"}]}) == [
        "s", [{"role": "user", "content": "q"}]]
    assert conversation_opening("responses", {"instructions": "i", "input": "q"}) == ["i", "q"]
    assert conversation_opening("embeddings", {"input": "q"}) is None


def test_the_dispatcher_hands_salt_and_session_to_the_backend(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path)
    tier = FakeBackend([Result(200, b"{}")])
    dispatcher = Dispatcher(parts.config, {"fast": tier}, None)
    cand = Candidate("tier", "fast", "fast", "model:fast")
    _, key = parts.keys.create(KeySpec(agent="bot"))

    async def run() -> None:
        request = Request("chat", {"model": "fast"}, stream=False, cache_salt="scope", session="s1")
        await dispatcher.dispatch(Decision("tier", "fast", "model:fast", (cand,)), request,
                                  parts.accounting.open(key, "fast", "chat"))

    asyncio.run(run())
    assert (tier.calls[0].cache_salt, tier.calls[0].session) == ("scope", "s1")


def test_auto_keeps_a_conversation_on_the_tier_it_started_on(tmp_path: Path) -> None:
    config = gateway_config(routing={"default_tier": "fast", "rules": [{"tier": "coder", "keywords": ["refactor"]}]})
    parts = gateway_parts(tmp_path, config)
    plaintext, _ = parts.keys.create(KeySpec(agent="bot"))
    auth = {"authorization": f"Bearer {plaintext}"}
    admission = Admission(parts.config, parts.keys, parts.limiter, parts.accounting)
    router = Router(parts.config)

    def admit(messages: list[dict[str, str]], model: str = "auto") -> Admitted:
        raw = orjson.dumps({"model": model, "messages": messages})
        return asyncio.run(admission.admit(http_request(raw, auth), "chat", router.route))

    opening = [{"role": "user", "content": "please refactor utils.py"}]
    first = admit(opening)
    assert first.decision.tier == "coder" and first.decision.reason.startswith("auto:rule0(keyword)")
    later = admit([*opening, {"role": "assistant", "content": "done"}, {"role": "user", "content": "thanks"}])
    assert later.decision.tier == "coder" and later.decision.reason.startswith("auto:session->coder")
    other = admit([{"role": "user", "content": "thanks"}])  # another conversation: the rules decide
    assert other.decision.tier == "fast"
    named = admit([*opening, {"role": "user", "content": "thanks"}], model="fast")
    assert named.decision.tier == "fast"  # a named model is never overridden
