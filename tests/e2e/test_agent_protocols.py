"""What agents speak, through the real SDKs, against the running app and against bare vLLM on the same model.

`fast` and the bare vLLM upstream (tests/conftest.py) serve the same tiny model with the same `hermes`
tool-call parser, so at temperature 0 every answer here must match bare vLLM's: status, shape and content.
Covered: chat tool calling (required, named, auto, streamed deltas, tool results in the next turn), JSON
schema output, the Responses API with tierserve's own per-key store, Anthropic Messages (plain, streamed,
tools, count_tokens, its error shape, `x-api-key`), embeddings, fallback per endpoint, and one agent
framework's tool loop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import anthropic
import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_MODEL, App, auth, create_key

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        # An enum: the grammar (tool_strict_level: parameter) holds the random weights to a value that ends.
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time",
                                         "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "what is the weather in Paris?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 0, "max_tokens": 60}


def _whitespace_tokens() -> dict[str, int]:
    """A logit bias against the tiny model's whitespace-only tokens. Its random weights, held by the grammar
    (tool_strict_level: parameter) to a tool's argument schema, would pad the JSON with whitespace, which the
    grammar allows, until max_tokens; without those tokens the grammar leaves them only the values."""
    from transformers import AutoTokenizer

    from serving.backends.tinymodel import cached_tiny_model

    tok = AutoTokenizer.from_pretrained(cached_tiny_model(Path.home() / ".cache" / "tierserve", 3))
    return {str(i): -100 for i in range(len(tok)) if (text := tok.decode([i])) and text.isspace()}


NO_PADDING = _whitespace_tokens()  # `fast`'s model (seed 3), bare vLLM's too
# Once they open a hermes `<tool_call>`, the random weights write call after call until max_tokens cuts the
# last one short (and the parser then finds none): stopping at the first call's end, as a trained model
# would, keeps one whole call (the parser reads an unterminated last tag too).
ONE_CALL: dict[str, Any] = {**GREEDY, "stop": ["</tool_call>"], "logit_bias": NO_PADDING}
GREEDY_BODY = {"temperature": 0}  # the Anthropic SDK has no temperature argument any more
LONG = "plan the deploy because the result " * 70  # ~600 estimated tokens: over the tiny tiers' 512 window


@pytest.fixture(scope="module")
def client(app_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def bare(upstream: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(app_url: str, api_key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def bare_claude(upstream: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=upstream.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(app_url: str, api_key: str) -> httpx.Client:
    with httpx.Client(base_url=app_url, timeout=120, headers=auth(api_key)) as c:
        yield c


def calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def both(client: openai.OpenAI, bare: openai.OpenAI, **request: Any) -> tuple[Any, Any]:
    """The same chat request to tierserve's `fast` and to bare vLLM."""
    ours = client.chat.completions.create(model="fast", **request)
    theirs = bare.chat.completions.create(model=UPSTREAM_MODEL, **request)
    return ours, theirs


# -- chat tool calling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_is_made_exactly_as_bare_vllm_makes_it(
    client: openai.OpenAI, bare: openai.OpenAI, choice: Any
) -> None:
    ours, theirs = both(client, bare, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, **ONE_CALL)
    message = ours.choices[0].message
    assert calls(message) and calls(message) == calls(theirs.choices[0].message)
    if choice == "required":
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason == "tool_calls"
    else:
        assert calls(message)[0][0] == "get_weather"
    assert all(c.id and c.type == "function" for c in message.tool_calls or [])
    assert ours.usage is not None and ours.usage.completion_tokens == theirs.usage.completion_tokens


def test_auto_and_none_answer_as_bare_vllm_does(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        ours, theirs = both(client, bare, messages=ASK, tools=[WEATHER], tool_choice=choice, **GREEDY)
        assert ours.choices[0].message.content == theirs.choices[0].message.content
        assert calls(ours.choices[0].message) == calls(theirs.choices[0].message)
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason


def streamed_calls(stream: Any) -> tuple[dict[int, list[str]], str | None]:
    """Tool-call deltas assembled per index: [name, arguments]; and the finish reason."""
    assembled: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = assembled.setdefault(delta.index, ["", ""])
            if delta.function and delta.function.name:
                entry[0] += delta.function.name
            if delta.function and delta.function.arguments:
                entry[1] += delta.function.arguments
        finish = choice.finish_reason or finish
    return assembled, finish


def test_streamed_tool_call_deltas_assemble_into_the_same_call(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    request = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "stream": True, **ONE_CALL}
    ours, finish = streamed_calls(client.chat.completions.create(model="fast", **request))
    theirs, bare_finish = streamed_calls(bare.chat.completions.create(model=UPSTREAM_MODEL, **request))
    assert ours and ours == theirs
    assert finish == bare_finish == "tool_calls"
    for name, arguments in ours.values():
        assert name in ("get_weather", "get_time")
        json.loads(arguments)  # whole JSON (random weights choose its values: `required` parses, not constrains)


def test_tool_results_go_back_in_the_next_turn(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="fast", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           **ONE_CALL)
    call = (first.choices[0].message.tool_calls or [])[0]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    ours, theirs = both(client, bare, messages=turn, tools=[WEATHER], **{**GREEDY, "max_tokens": 12})
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage is not None and theirs.usage is not None
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_a_tier_without_a_tool_parser_names_the_setting(client: openai.OpenAI) -> None:
    for choice in (None, "auto", "required"):  # None: "auto", the default when tools are given
        extra = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="coder", messages=ASK, tools=[WEATHER], max_tokens=4, **extra)
        error = caught.value.body
        assert isinstance(error, dict)
        assert "tiers.coder.tool_call_parser" in error["message"] and error["param"] == "tool_choice"
        assert "--tool-call-parser" not in error["message"]
    # Tools listed but not to be called still work there.
    plain = client.chat.completions.create(model="coder", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           **GREEDY)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_json_schema_output_is_constrained_as_bare_vllm_constrains_it(
    client: openai.OpenAI, bare: openai.OpenAI
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    request = {"messages": ASK, "temperature": 0, "max_tokens": 40,
               "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}}
    ours, theirs = both(client, bare, **request)
    text = ours.choices[0].message.content or ""
    assert text == theirs.choices[0].message.content
    assert re.sub(r"\s", "", text).startswith('{"city":"')  # the grammar, not the random weights, chose these
    if ours.choices[0].finish_reason == "stop":
        assert set(json.loads(text)) == {"city"}


def test_a_tier_with_a_reasoning_parser_returns_its_thinking_apart(http: httpx.Client) -> None:
    # `spare` (tests/conftest.py) has vLLM's deepseek_r1 reasoning parser: what the model writes before
    # `</think>` is `reasoning`, the rest the answer. It scales to zero: the first request waits for it.
    body = {"model": "cold", "messages": [{"role": "user", "content": "think first"}], "max_tokens": 6,
            "min_tokens": 6, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-tierserve-provider"] == "local", dict(r.headers)  # not a provider without the parser
    message = r.json()["choices"][0]["message"]
    assert message["reasoning"], message
    if "</think>" not in message["reasoning"]:  # random weights rarely close their thinking
        assert message.get("content") in (None, "")
    hidden = http.post("/v1/chat/completions", json={**body, "include_reasoning": False}, timeout=300).json()
    assert not hidden["choices"][0]["message"].get("reasoning")
    streamed = ""
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += choice["delta"].get("reasoning") or ""
    assert streamed == message["reasoning"]


# -- the Responses API --------------------------------------------------------------------------------------


def test_responses_answer_as_bare_vllm_does(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    request = {"input": "hello there", "max_output_tokens": 8, "temperature": 0}
    ours = client.responses.create(model="fast", **request)
    theirs = bare.responses.create(model=UPSTREAM_MODEL, **request)
    assert ours.id.startswith("resp_") and ours.object == "response"
    assert ours.output_text == theirs.output_text and ours.status == theirs.status
    assert ours.usage is not None and theirs.usage is not None
    assert (ours.usage.input_tokens, ours.usage.output_tokens) == (theirs.usage.input_tokens,
                                                                   theirs.usage.output_tokens)
    assert ours.store is True  # kept by tierserve, not by the engine


def test_streamed_responses_send_the_same_events_as_bare_vllm(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    request = {"input": "hello there", "max_output_tokens": 8, "temperature": 0, "stream": True}
    ours = list(client.responses.create(model="fast", **request))
    theirs = list(bare.responses.create(model=UPSTREAM_MODEL, **request))

    def kinds(events: list[Any]) -> list[str]:  # event types in order, a run of deltas counted once
        out: list[str] = []
        for e in events:
            if not out or out[-1] != e.type:
                out.append(e.type)
        return out

    assert kinds(ours) == kinds(theirs)
    assert ours[0].type == "response.created" and ours[-1].type == "response.completed"
    assert ours[-1].response.usage.output_tokens == theirs[-1].response.usage.output_tokens
    text = "".join(e.delta for e in ours if e.type == "response.output_text.delta")
    assert text == "".join(e.delta for e in theirs if e.type == "response.output_text.delta")


def test_responses_tool_calls(client: openai.OpenAI, bare: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": WEATHER["function"]["parameters"]}  # type: ignore[index]
    # A named tool: vLLM constrains the arguments to the tool's schema.
    request = {"input": "weather in Paris?", "tools": [tool], "temperature": 0, "max_output_tokens": 60,
               "tool_choice": {"type": "function", "name": "get_weather"},
               "extra_body": {"logit_bias": NO_PADDING}}  # vLLM's extension of the Responses API
    ours = client.responses.create(model="fast", **request)
    theirs = bare.responses.create(model=UPSTREAM_MODEL, **request)
    mine = [(o.name, json.loads(o.arguments)) for o in ours.output if o.type == "function_call"]
    assert mine and mine == [(o.name, json.loads(o.arguments)) for o in theirs.output if o.type == "function_call"]
    assert mine[0] in (("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"}))


def test_previous_response_id_continues_per_key_and_no_other_key_sees_it(
    client: openai.OpenAI, app: App, app_url: str
) -> None:
    first = client.responses.create(model="fast", input="remember the word blue", max_output_tokens=4,
                                    temperature=0)
    second = client.responses.create(model="fast", input="which word?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    # The first turn (its input and output) was inlined: the second prompt is longer than its own input.
    alone = client.responses.create(model="fast", input="which word?", max_output_tokens=4, temperature=0,
                                    store=False)
    assert second.usage is not None and alone.usage is not None and first.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store: false keeps nothing

    other = openai.OpenAI(base_url=f"{app_url}/v1", api_key=create_key(app.env, app.config, "--agent", "other"),
                          max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.retrieve(first.id)
    assert caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="fast", input="x", previous_response_id=first.id, max_output_tokens=2)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "previous_response_id"
    # The owner can delete it; then it is gone for them too.
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


# -- Anthropic Messages -------------------------------------------------------------------------------------


def test_messages_answer_as_bare_vllm_does(claude: anthropic.Anthropic, bare_claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {"max_tokens": 8, "extra_body": GREEDY_BODY, "messages": [{"role": "user",
                                                                                         "content": "hi"}]}
    ours = claude.messages.create(model="fast", **request)  # the SDK authenticates with x-api-key
    theirs = bare_claude.messages.create(model=UPSTREAM_MODEL, **request)
    assert ours.type == "message" and ours.role == "assistant"
    assert [b.type for b in ours.content] == [b.type for b in theirs.content]
    assert ours.content[0].text == theirs.content[0].text  # type: ignore[union-attr]
    assert ours.stop_reason == theirs.stop_reason
    assert (ours.usage.input_tokens, ours.usage.output_tokens) == (theirs.usage.input_tokens,
                                                                   theirs.usage.output_tokens)


def test_streamed_messages_carry_the_same_text(claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {"max_tokens": 8, "extra_body": GREEDY_BODY, "messages": [{"role": "user",
                                                                                         "content": "hi"}]}
    whole = claude.messages.create(model="fast", **request)
    with claude.messages.stream(model="fast", **request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == whole.stop_reason


def test_messages_tool_use_as_bare_vllm(claude: anthropic.Anthropic, bare_claude: anthropic.Anthropic) -> None:
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]
    # A named tool: vLLM constrains its input to the tool's schema (Anthropic's `tool_use.input` is an object).
    request: dict[str, Any] = {"max_tokens": 60, "extra_body": GREEDY_BODY, "tools": [tool],
                               "tool_choice": {"type": "tool", "name": "get_weather"},
                               "messages": [{"role": "user", "content": "weather in Paris?"}]}
    ours = claude.messages.create(model="fast", **request)
    theirs = bare_claude.messages.create(model=UPSTREAM_MODEL, **request)
    # Anthropic's API has no logit bias to keep the random weights from padding the arguments (see
    # NO_PADDING), so whether a whole call comes out is up to them: the test is that it comes out as bare
    # vLLM's does, block for block.
    assert [b.model_dump(exclude={"id"}) for b in ours.content] == [b.model_dump(exclude={"id"})
                                                                     for b in theirs.content]
    assert ours.stop_reason == theirs.stop_reason and ours.usage.output_tokens == theirs.usage.output_tokens
    assert ours.usage.input_tokens == theirs.usage.input_tokens > 40  # the tool's definition was in the prompt


def test_count_tokens_matches_bare_vllm(claude: anthropic.Anthropic, bare_claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {"messages": [{"role": "user", "content": "count these words please"}]}
    ours = claude.messages.count_tokens(model="fast", **request)
    theirs = bare_claude.messages.count_tokens(model=UPSTREAM_MODEL, **request)
    assert ours.input_tokens == theirs.input_tokens > 0


def test_messages_errors_come_in_anthropics_shape(app_url: str, claude: anthropic.Anthropic) -> None:
    wrong = anthropic.Anthropic(base_url=app_url, api_key="ts_nope_nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model="fast", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    r = httpx.post(f"{app_url}/v1/messages", headers={"x-api-key": claude.api_key},
                   json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("max_tokens")


# -- embeddings ---------------------------------------------------------------------------------------------


def test_embeddings_from_the_embedding_tier(client: openai.OpenAI, http: httpx.Client) -> None:
    resp = client.embeddings.create(model="embed", input=["def add(a, b)", "return a + b"])
    assert [d.index for d in resp.data] == [0, 1]
    assert len(resp.data[0].embedding) == len(resp.data[1].embedding) > 0
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens > 0
    again = client.embeddings.create(model="tiny-embed", input="def add(a, b)")
    assert again.data[0].embedding == pytest.approx(resp.data[0].embedding)
    r = http.post("/v1/embeddings", json={"model": "auto", "input": "hello"})
    assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "embed"
    assert "embed" in [m.id for m in client.models.list().data]


def test_a_tier_asked_for_what_it_does_not_serve_says_so(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "fast", "input": "hello"})
    assert r.status_code == 400 and "embeddings" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": "embed", "messages": ASK, "max_tokens": 2})
    assert r.status_code == 400 and "embed" in r.json()["error"]["message"]


# -- fallback per endpoint ----------------------------------------------------------------------------------


def test_a_responses_request_too_long_for_the_tier_goes_to_a_provider_that_speaks_it(
    http: httpx.Client, proxies: dict
) -> None:
    before = proxies["peer"].stats.requests
    r = http.post("/v1/responses", json={"model": "fast", "input": LONG, "max_output_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.headers["x-tierserve-provider"] == "peer"
    assert r.json()["object"] == "response" and r.json()["usage"]["output_tokens"] > 0
    assert proxies["peer"].stats.requests == before + 1


# -- an agent framework's tool loop -------------------------------------------------------------------------


def test_an_agent_framework_completes_a_two_step_tool_loop(app_url: str, app: App) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.capabilities.abstract import AbstractCapability
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    class LookUpThenAnswer(AbstractCapability[None]):
        """Step one must call get_weather (tool_choice names it: vLLM constrains the arguments to its schema,
        which random weights need); step two must answer in text (tool_choice "none")."""

        def get_model_settings(self) -> Any:
            return lambda ctx: ModelSettings(tool_choice=["get_weather"] if ctx.run_step <= 1 else "none")

    looked_up: list[str] = []

    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        looked_up.append(city)
        return "sunny"

    key = create_key(app.env, app.config, "--agent", "pydantic-ai")
    model = OpenAIChatModel("fast", provider=OpenAIProvider(base_url=f"{app_url}/v1", api_key=key))
    # The tiny tokenizer spells the call's envelope a character a token: room for it, one call (ONE_CALL),
    # and no padding.
    agent = Agent(model, tools=[get_weather], capabilities=[LookUpThenAnswer()],
                  model_settings=ModelSettings(temperature=0, max_tokens=80, stop_sequences=ONE_CALL["stop"],
                                               logit_bias={int(k): v for k, v in NO_PADDING.items()}))
    result = agent.run_sync("What is the weather in Paris?")
    # Two requests: the tool call, run by the framework, its result sent back, then the final answer.
    assert looked_up in (["Paris"], ["Rome"]), result.all_messages()
    assert isinstance(result.output, str) and result.output
    assert result.usage.requests == 2
    kinds = [part.part_kind for message in result.all_messages() for part in message.parts]
    assert kinds.count("tool-call") == 1 and kinds.count("tool-return") == 1
