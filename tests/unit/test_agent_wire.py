"""The pure parts of the agent protocols: each protocol's error envelope, routing per endpoint, admission's
`x-api-key` and Responses continuation, and how a tier's stream events carry usage and end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from serving.backends.tier import _scan, _usage_of
from serving.config import build_config
from serving.gateway.admission import Admission
from serving.gateway.conversations import Conversations, ResponseStore
from serving.gateway.router import RequestFacts, Router, TierState
from serving.security.keys import KeySpec
from serving.wire.errors import APIError, protocol_of, render_json, render_sse
from serving.wire.items import ProviderState, Result, Usage
from serving.wire.sse import is_error_event
from tests.support.gateway import TINY, gateway_config, gateway_parts, http_request

# -- error envelopes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                              (403, "permission_error"), (404, "not_found_error"),
                                              (429, "rate_limit_error"), (503, "api_error")])
def test_anthropic_routes_get_anthropics_envelope(status: int, kind: str) -> None:
    error = APIError(status, "max_tokens: field required", param="max_tokens")
    assert orjson.loads(render_json(error, "anthropic")) == {
        "type": "error", "error": {"type": kind, "message": "max_tokens: field required"}}
    event = render_sse(error, "anthropic")
    assert event.startswith(b"event: error\ndata: ") and is_error_event(event)
    assert orjson.loads(event.split(b"data: ", 1)[1])["error"]["type"] == kind


def test_an_error_result_round_trips_into_another_protocol() -> None:
    result = Result.error(APIError(429, "slow down", code="rate_limit_exceeded"))
    again = APIError.from_body(result.status, result.body)
    assert (again.status, again.message, again.code) == (429, "slow down", "rate_limit_exceeded")
    assert orjson.loads(render_json(again, "anthropic"))["error"]["type"] == "rate_limit_error"
    assert APIError.from_body(502, b"not json").message == "not json"


def test_responses_streams_end_on_the_responses_apis_error_event() -> None:
    event = render_sse(APIError(502, "upstream cut", code="upstream_stream_error"), "responses")
    assert event.startswith(b"event: error\ndata: ")
    assert orjson.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error", "code": "upstream_stream_error", "message": "upstream cut", "param": None}
    assert render_sse(APIError(500, "x"), "openai").startswith(b'data: {"error"')
    assert [protocol_of(e) for e in ("chat", "responses", "messages", "count_tokens", "embeddings")] == [
        "openai", "responses", "anthropic", "anthropic", "openai"]


# -- routing per endpoint -----------------------------------------------------------------------------------


def two_kinds(**over: Any) -> Router:
    data: dict[str, Any] = {
        "tiers": {"fast": {"served_name": "f", "model": TINY},
                  "embed": {"served_name": "e", "model": TINY, "task": "embed"}},
        "providers": [{"name": "peer", "kind": "vllm", "base_url": "http://127.0.0.1:9/v1", "default_model": "m",
                       "endpoints": ["chat", "responses"]},
                      {"name": "claude", "kind": "anthropic", "base_url": "https://api.anthropic.com/v1",
                       "default_model": "claude-x"}],
        "routing": {"default_tier": "fast"},
        **over,
    }
    return Router(build_config(data, None))


def test_auto_picks_a_tier_that_serves_the_endpoint() -> None:
    router = two_kinds()
    assert router.route(RequestFacts("auto", "embeddings")).tier == "embed"
    assert router.route(RequestFacts("auto", "chat")).tier == "fast"


@pytest.mark.parametrize(("model", "endpoint", "words"), [("embed", "chat", "an embedding model"),
                                                          ("fast", "embeddings", "a generating model")])
def test_a_tier_named_for_what_it_does_not_serve_is_a_400(model: str, endpoint: Any, words: str) -> None:
    decision = two_kinds().route(RequestFacts(model, endpoint))
    error = decision.error()
    assert decision.kind == "reject" and error.status == 400 and error.param == "model"
    assert words in error.message and error.code == "unsupported_endpoint"


def test_providers_that_do_not_speak_the_endpoint_are_skipped_with_the_reason() -> None:
    router = two_kinds()
    down = {"fast": TierState(healthy_replicas=0)}
    decision = router.route(RequestFacts("fast", "messages"), down, {})
    # peer does not speak Messages; Anthropic does, natively.
    assert [c.name for c in decision.candidates] == ["claude"]
    assert ("provider:peer", "does not speak messages") in decision.skipped
    decision = router.route(RequestFacts("fast", "responses"), down, {"peer": ProviderState()})
    assert [c.name for c in decision.candidates] == ["peer"]
    assert ("provider:claude", "does not speak responses") in decision.skipped
    nobody = router.route(RequestFacts("fast", "completion"), down, {})
    assert nobody.kind == "reject" and nobody.status == 503
    assert "provider:peer: does not speak completion" in nobody.error().message


def test_provider_endpoints_default_to_what_their_kind_speaks() -> None:
    config = two_kinds().config
    assert config.providers[1].endpoints == ["chat", "messages", "count_tokens"]
    assert config.tiers["embed"].endpoints == ("embeddings",)
    assert "embeddings" not in config.tiers["fast"].endpoints


# -- admission ----------------------------------------------------------------------------------------------


def admit(parts: Any, endpoint: Any, raw: dict[str, Any], headers: dict[str, str],
          conversations: Conversations | None = None) -> Any:
    router = Router(parts.config)
    admission = Admission(parts.config, parts.keys, parts.limiter, parts.accounting, conversations)
    return asyncio.run(admission.admit(http_request(orjson.dumps(raw), headers), endpoint, router.route))


def test_the_anthropic_sdks_x_api_key_authenticates(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path, gateway_config(auth={"enabled": True}))
    plaintext, key = parts.keys.create(KeySpec(agent="claude-code"))
    body = {"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    admitted = admit(parts, "messages", body, {"x-api-key": plaintext})
    assert admitted.key.id == key.id and admitted.endpoint == "messages"
    with pytest.raises(APIError) as err:
        admit(parts, "messages", body, {"x-api-key": "ts_nope_nope"})
    assert err.value.status == 401


def test_a_responses_request_is_admitted_with_its_conversation_inlined(tmp_path: Path) -> None:
    parts = gateway_parts(tmp_path, gateway_config(auth={"enabled": True}))
    store = ResponseStore(tmp_path / "responses.db", clock=parts.clock)
    conversations = Conversations(store)
    mine, me = parts.keys.create(KeySpec(agent="codex"))
    theirs, _ = parts.keys.create(KeySpec(agent="other"))
    first = {"model": "fast", "input": "remember blue"}
    store.save(me.id, {**first, "store": False}, {"id": "resp_1", "object": "response", "output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}]})
    body = {"model": "fast", "input": "which colour?", "previous_response_id": "resp_1"}
    admitted = admit(parts, "responses", body, {"authorization": f"Bearer {mine}"}, conversations)
    assert admitted.received == body
    assert admitted.body["store"] is False and "previous_response_id" not in admitted.body
    assert [item.get("role") for item in admitted.body["input"]] == ["user", "assistant", "user"]
    assert admitted.facts.prompt_tokens > 0
    with pytest.raises(APIError) as err:  # another key: as absent as a response never made, and accounted
        admit(parts, "responses", body, {"authorization": f"Bearer {theirs}"}, conversations)
    assert err.value.status == 404 and err.value.param == "previous_response_id"
    assert parts.sample("tierserve_agent_requests_total", agent="other", status="404") == 1


# -- a tier's stream events ---------------------------------------------------------------------------------


def test_messages_and_responses_events_carry_usage_and_end_the_stream() -> None:
    delta = 'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":5,"output_tokens":3}}\n\n'
    assert _scan("messages", delta) == (Usage(5, 3), False)
    assert _scan("messages", 'event: message_stop\ndata: {"type":"message_stop"}\n\n') == (None, True)
    assert _scan("messages", 'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n') == (None, False)
    done = ('event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
            '{"input_tokens":7,"output_tokens":2}}}\n\n')
    assert _scan("responses", done) == (Usage(7, 2), True)
    assert _scan("responses", 'event: response.output_text.delta\ndata: {"delta":"x"}\n\n') == (None, False)
    assert _scan("chat", "data: [DONE]\n\n") == (None, True)
    assert _usage_of("embeddings", {"prompt_tokens": 4, "total_tokens": 4}) == Usage(4, 0)
    assert _usage_of("count_tokens", {"input_tokens": 9}) == Usage()  # counting is free
    assert _usage_of("responses", None) == Usage()
