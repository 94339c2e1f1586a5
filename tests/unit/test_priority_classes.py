"""Priority classes per key: the key's class, the CLI, the router keeping batch keys off paid providers, and the
tier handing vLLM the priority (on vLLM's real request types; no engine)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from serving.cli import main
from serving.config import AppConfig, Tier, build_config
from serving.gateway.router import RequestFacts, Router, TierState, facts_from_body
from serving.security.keys import PRIORITY_VALUE, KeySpec, KeyStore, split_key
from serving.wire.errors import APIError
from serving.wire.items import Call
from tests.support.gateway import gateway_parts
from tests.unit.test_admission import admit_with, body

TINY = {"tiny_seed": 1}


# -- the key's class ------------------------------------------------------------------------------------------


def test_a_key_is_standard_unless_given_a_class() -> None:
    assert KeySpec(agent="a").priority == "standard"
    assert KeySpec.parse({"agent": "a", "priority": "batch"}).priority == "batch"
    assert [PRIORITY_VALUE[c] for c in ("interactive", "standard", "batch")] == [-10, 0, 10]  # lower goes first


@pytest.mark.parametrize("value", ["urgent", -10, None])
def test_a_bad_class_is_a_400_naming_priority(value: Any) -> None:
    with pytest.raises(APIError) as err:
        KeySpec.parse({"agent": "a", "priority": value})
    assert err.value.status == 400 and err.value.param == "priority"


def test_cli_creates_and_lists_the_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys.json"
    monkeypatch.setenv("TIERSERVE_KEYS_FILE", str(keys_file))
    base = ["keys", "--config", str(tmp_path / "none.yaml"), "--state-dir", str(tmp_path / "state")]
    assert main([*base, "create", "--agent", "nightly", "--priority", "batch"]) == 0
    plaintext = capsys.readouterr().out.strip()
    assert split_key(plaintext) is not None
    assert KeyStore(keys_file).authenticate(f"Bearer {plaintext}").priority == "batch"
    assert main([*base, "create", "--agent", "chat-ui"]) == 0
    capsys.readouterr()

    assert main([*base, "list", "--json"]) == 0
    listed = {k["agent"]: k["priority"] for k in json.loads(capsys.readouterr().out)}
    assert listed == {"nightly": "batch", "chat-ui": "standard"}
    assert main([*base, "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "PRIORITY" in header.split()
    assert "batch" in next(r for r in rows if "nightly" in r).split()

    with pytest.raises(SystemExit) as exc:
        main([*base, "create", "--agent", "x", "--priority", "urgent"])
    assert exc.value.code == 2  # argparse names the choices
    assert "interactive" in capsys.readouterr().err


# -- routing: batch keys stay off paid providers --------------------------------------------------------------


def config(**routing: Any) -> AppConfig:
    return build_config({
        "tiers": {"fast": {"served_name": "tiny-fast", "model": TINY, "overflow": {"max_queue_per_replica": 2}}},
        "providers": [
            {"name": "peer", "kind": "tierserve", "base_url": "http://10.0.0.2:8000/v1", "default_model": "fast",
             "priority": 10},
            {"name": "openai", "base_url": "https://api.openai.com/v1", "default_model": "gpt-4o-mini",
             "paid": True, "priority": 20},
        ],
        "routing": {"allow_paid": True, **routing},
    }, None)


def names(decision: Any) -> list[str]:
    return [f"{c.kind}:{c.name}" for c in decision.candidates]


SPILL_REASON = "paid provider: batch keys queue instead (routing.batch_spills_to_paid)"


@pytest.mark.parametrize("priority", ["interactive", "standard"])
def test_other_classes_may_spill_to_paid(priority: str) -> None:
    d = Router(config()).route(RequestFacts(model="fast", priority=priority))
    assert names(d) == ["tier:fast", "provider:peer", "provider:openai"]
    assert not d.skipped


def test_batch_keys_skip_paid_providers_and_say_so() -> None:
    router = Router(config())
    d = router.route(RequestFacts(model="fast", priority="batch"))
    assert names(d) == ["tier:fast", "provider:peer"]
    assert ("provider:openai", SPILL_REASON) in d.skipped

    full = {"fast": TierState(healthy_replicas=1, ongoing=2)}
    assert names(router.route(RequestFacts(model="fast", priority="batch"), full)) == ["provider:peer"]
    # With only the paid provider left, the tier's own status (saturated: 429), not a provider's.
    cfg = config()
    alone = Router(build_config({**cfg.model_dump(), "providers": [cfg.providers[1].model_dump()]}, None))
    d = alone.route(RequestFacts(model="fast", priority="batch"), full)
    assert d.kind == "reject" and d.status == 429 and SPILL_REASON in d.error().message


def test_batch_spills_to_paid_when_allowed() -> None:
    d = Router(config(batch_spills_to_paid=True)).route(RequestFacts(model="fast", priority="batch"))
    assert names(d) == ["tier:fast", "provider:peer", "provider:openai"]
    # allow_paid still comes first: it is the zero-budget switch for every key.
    d = Router(config(batch_spills_to_paid=True, allow_paid=False)).route(RequestFacts(model="fast", priority="batch"))
    assert ("provider:openai", "paid use disabled (routing.allow_paid: false)") in d.skipped


def test_facts_carry_the_keys_class(tmp_path: Path) -> None:
    chat = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    assert facts_from_body("chat", chat, {}, config().routing).priority == "standard"
    assert facts_from_body("chat", chat, {}, config().routing, priority="batch").priority == "batch"

    parts = gateway_parts(tmp_path)
    plaintext, _ = parts.keys.create(KeySpec(agent="nightly", priority="batch"))
    auth = {"authorization": f"Bearer {plaintext}"}
    admitted, routed = admit_with(parts, body(), auth)
    assert routed[0].priority == "batch" and admitted.key.priority == "batch"
    with pytest.raises(APIError) as err:  # the body never sets it: only the key does
        admit_with(parts, body(priority=-100), auth)
    assert err.value.status == 400 and err.value.param == "priority"


# -- the tier: engine args and the request vLLM gets ----------------------------------------------------------


def tier(task: str = "generate", **engine: Any) -> Tier:
    return Tier.model_validate({"served_name": "t", "model": TINY, "task": task, "engine": engine})


@pytest.mark.parametrize("task", ["generate", "embed"])
def test_engine_args_schedule_by_priority_unless_fcfs(task: str) -> None:
    pytest.importorskip("vllm")
    from serving.backends.tier import engine_args

    assert engine_args(tier(task), Path("/m")).scheduling_policy == "priority"
    assert engine_args(tier(task, scheduling_policy="fcfs"), Path("/m")).scheduling_policy == "fcfs"
    with pytest.raises(ValueError, match="scheduling_policy"):
        tier(task, scheduling_policy="lifo")


def _requests() -> list[tuple[str, Any, dict[str, Any]]]:
    from pydantic import TypeAdapter
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    from serving.backends.tier import Route

    def handle(r: Any) -> Any:
        raise AssertionError("not called")

    return [
        ("chat", Route(ChatCompletionRequest, handle), {"messages": [{"role": "user", "content": "hi"}]}),
        ("completion", Route(CompletionRequest, handle), {"prompt": "hi"}),
        ("responses", Route(ResponsesRequest, handle), {"input": "hi"}),
        ("embeddings", Route(TypeAdapter(EmbeddingRequest), handle), {"input": "hi"}),
    ]


def test_engine_fields_set_priority_and_salt_of_each_vllm_request_type() -> None:
    pytest.importorskip("vllm")
    from serving.backends.tier import with_engine_fields

    for endpoint, route, request_body in _requests():
        request = route.validate({"model": "t", **request_body, "cache_salt": "from-the-client"})
        assert request.priority == 0, endpoint
        set_ = with_engine_fields(request, -10, "scope-a")
        assert (set_.priority, set_.cache_salt) == (-10, "scope-a"), endpoint
        assert with_engine_fields(request, 0, None).cache_salt is None, endpoint  # shared: no salt


def test_anthropic_messages_carry_the_priority_into_vllms_chat_request() -> None:
    pytest.importorskip("vllm")
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    from serving.backends.tier import _MESSAGES_PRIORITY, _prioritized_messages

    messages = _prioritized_messages(AnthropicServingMessages)
    request = AnthropicMessagesRequest.model_validate(
        {"model": "t", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "cache_salt": "scope-a"})
    assert "priority" not in AnthropicMessagesRequest.model_fields  # why the context variable exists
    chat = messages.to_chat_completion_request(request)
    assert (chat.priority, chat.cache_salt) == (0, "scope-a")
    token = _MESSAGES_PRIORITY.set(10)
    try:
        assert messages.to_chat_completion_request(request).priority == 10
    finally:
        _MESSAGES_PRIORITY.reset(token)


class _Engine:
    errored = False


class _Answer:
    error = None

    def model_dump(self, **kw: Any) -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}


def _server(t: Tier, seen: list[Any]) -> Any:
    """A TierServer without an engine: its routes are vLLM's request types with a handler that records."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from serving.backends.tier import Route, TierServer
    from serving.ops.tracing import Tracing

    async def handle(request: Any) -> Any:
        seen.append(request)
        return _Answer()

    class Bare(TierServer):
        def shutdown(self) -> None:
            pass  # no engine, and no processes of this test run to reap

    server = object.__new__(Bare)
    server.tier_name, server.tier, server.engine, server.replica_id = "fast", t, _Engine(), "r1"
    server.tracing = Tracing("t", environ={})
    server.routes = {"chat": Route(ChatCompletionRequest, handle)}
    return server


@pytest.mark.parametrize(("policy", "sent"), [("priority", -10), ("fcfs", 0)])
def test_the_tier_submits_the_calls_priority(policy: str, sent: int) -> None:
    pytest.importorskip("vllm")
    seen: list[Any] = []
    server = _server(tier(scheduling_policy=policy), seen)
    call = Call("chat", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, "fast", priority=-10,
                cache_salt="scope-a")
    result = asyncio.run(server.complete(call))
    assert result.status == 200 and seen[-1].priority == sent and seen[-1].cache_salt == "scope-a"
    assert result.replica == "r1"  # the x-tierserve-replica header's value

    async def drain() -> list[Any]:
        return [item async for item in server.stream(replace(call, body={**call.body, "stream": True}))]

    asyncio.run(drain())  # the handler's answer is not a stream: an error item, but the request was built
    assert seen[-1].priority == sent and seen[-1].stream and seen[-1].cache_salt == "scope-a"


def test_the_probe_keeps_priority_zero() -> None:
    pytest.importorskip("vllm")
    seen: list[dict[str, Any]] = []

    class Engine:
        async def generate(self, prompt: Any, params: Any, request_id: str, **kw: Any) -> Any:
            seen.append(kw)
            yield None

    server = _server(tier(), [])
    server.engine = Engine()
    asyncio.run(server.probe())
    assert seen == [{}]  # no priority: vLLM's default 0


def test_the_policy_is_not_also_set_through_extra() -> None:
    with pytest.raises(ValueError, match=r"extra must not repeat engine settings \(scheduling_policy\)"):
        tier(extra={"scheduling_policy": "fcfs"})
