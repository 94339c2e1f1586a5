"""Hostile input against the real app: generated bodies (hypothesis) and hand-written attacks.

Pass criterion for every case: no 5xx, an answer within the client's time limit (no hang), errors in the
OpenAI envelope; and afterwards the app answers a normal request exactly as it did before.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.config import ANTHROPIC_ENDPOINTS, LimitsConfig
from serving.gateway.params import allowed_params
from tests.conftest import auth

TIMEOUT_S = 60  # any answer slower than this is a hang (the engine generates at most a few tokens here)
CASES: Counter[str] = Counter()  # what ran, by kind and status, printed at the end
REFERENCE = {"model": "fast", "messages": [{"role": "user", "content": "The reference request"}],
             "max_tokens": 8, "temperature": 0, "seed": 7}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "responses": "/v1/responses",
         "messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens", "embeddings": "/v1/embeddings"}
# What a success holds per endpoint: a key of its JSON body, and what marks the end of its event stream (chat and
# completions end with [DONE], the Responses API and Anthropic's with named events; the others don't stream).
ANSWERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chat": ("choices", ("data: [DONE]",)),
    "completion": ("choices", ("data: [DONE]",)),
    "responses": ("output", ("response.completed", "response.incomplete", "response.failed")),
    "messages": ("content", ("message_stop",)),
    "count_tokens": ("input_tokens", ()),
    "embeddings": ("data", ()),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` four times in five: enough whole requests get through the validators to reach the engine."""
    return st.integers(0, 4).flatmap(lambda i: hostile if i == 0 else valid)


models = mostly(st.sampled_from(["fast", "auto", "tiny-fast", "small"]), st.sampled_from(["nope", ""]) | json_values)
# The embedding tier's names; a generating tier's is a refusal there.
embed_models = mostly(st.sampled_from(["embed", "tiny-embed", "auto"]),
                      st.sampled_from(["nope", "", "fast"]) | json_values)
small_max_tokens = mostly(st.integers(1, 6), st.sampled_from([-3, 0, 512, 513, 10**6, 2**63, 2**64]) | json_values)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant"]),
                    st.sampled_from(["tool", "developer", "bogus"]) | json_values),
     "content": mostly(st.text(max_size=60), json_values)},
    optional={"name": json_values, "tool_calls": json_values},
)
# A Responses API input item: mostly a message, sometimes a function call or its output.
input_item = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant", "developer"]), json_values),
     "content": mostly(st.text(max_size=60) | st.lists(st.fixed_dictionaries(
         {"type": st.just("input_text"), "text": st.text(max_size=30)}), min_size=1, max_size=2), json_values)},
    optional={"type": mostly(st.just("message"), st.sampled_from(["function_call", "function_call_output"])
                             | json_values),
              "call_id": json_values, "output": json_values, "arguments": json_values},
)
# An Anthropic content block: mostly text, sometimes a tool use or result with any fields.
block = st.fixed_dictionaries(
    {"type": mostly(st.just("text"), st.sampled_from(["tool_use", "tool_result", "image", "bogus"]) | json_values),
     "text": mostly(st.text(max_size=60), json_values)},
    optional={"id": json_values, "name": json_values, "input": json_values, "tool_use_id": json_values,
              "content": json_values},
)
anthropic_message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "assistant"]), st.sampled_from(["system", "tool", "bogus"]) | json_values),
     "content": mostly(st.text(max_size=60) | st.lists(block, min_size=1, max_size=3), json_values)},
)
token_ids = st.lists(st.integers(0, 1000), min_size=1, max_size=6)


def body_strategy(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request whose core fields are mostly well-formed, plus up to three of the parameters the server accepts
    (the public API's and vLLM's names, or an unknown one) with any JSON value, so that cases reach the engine as
    well as the validators. The output-token field (`max_tokens`, the Responses API's `max_output_tokens`) is
    always present where the endpoint has one and mostly small, so valid cases stay quick."""
    required: dict[str, st.SearchStrategy[Any]] = {"model": embed_models if endpoint == "embeddings" else models}
    if endpoint in ("chat", "completion", "messages"):
        required["max_tokens"] = small_max_tokens
    elif endpoint == "responses":
        required["max_output_tokens"] = small_max_tokens
    if endpoint == "chat":
        required["messages"] = mostly(st.lists(message, min_size=1, max_size=3), json_values)
    elif endpoint == "completion":
        required["prompt"] = mostly(st.text(max_size=60) | st.lists(st.integers(0, 1000), min_size=1, max_size=6),
                                    st.lists(st.integers(-5, 40000), max_size=6) | json_values)
    elif endpoint == "responses":
        required["input"] = mostly(st.text(max_size=60) | st.lists(input_item, min_size=1, max_size=3), json_values)
    elif endpoint in ANTHROPIC_ENDPOINTS:
        required["messages"] = mostly(st.lists(anthropic_message, min_size=1, max_size=3), json_values)
    else:
        texts = st.text(min_size=1, max_size=60) | st.lists(st.text(max_size=30), min_size=1, max_size=3)
        required["input"] = mostly(texts | token_ids | st.lists(token_ids, min_size=1, max_size=3),
                                   st.lists(st.integers(-5, 40000), max_size=6) | json_values)
    params = sorted(allowed_params(endpoint, LimitsConfig()) - set(required))
    extras = st.dictionaries(st.sampled_from([*params, "stream", "not_a_parameter"]), json_values, max_size=2)
    return st.tuples(st.fixed_dictionaries(required), extras).map(lambda pair: {**pair[1], **pair[0]})


@pytest.fixture(scope="module")
def http(app_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app_url, timeout=TIMEOUT_S, headers=auth(api_key)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(http: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The text of a normal request before the fuzzing; compared with the same request after it."""
    before = http.post("/v1/chat/completions", json=REFERENCE)
    assert before.status_code == 200, before.text
    yield before.json()["choices"][0]["message"]["content"]
    after = http.post("/v1/chat/completions", json=REFERENCE)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]
    summary = f"{sum(CASES.values())} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items()))
    print(f"\n[fuzz] {summary}")
    (tmp_path_factory.getbasetemp() / "fuzz-cases.txt").write_text(summary + "\n")  # kept with the run's files


def check(r: httpx.Response, kind: str, case: str = "", endpoint: str = "chat") -> None:
    """The pass criterion for one case, answered on `endpoint`'s route."""
    CASES[f"{kind}:{r.status_code}"] += 1
    assert r.status_code < 500, (case, r.status_code, r.text[:500])
    key, stream_ends = ANSWERS[endpoint]
    if r.status_code >= 400:
        error = r.json()["error"]
        # OpenAI's envelope names a `code`; Anthropic's, on the Messages routes, only a `type`.
        named = error.get("type") if endpoint in ANTHROPIC_ENDPOINTS else error.get("code")
        assert isinstance(error["message"], str) and isinstance(named, str), error
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert stream_ends, (case, "a stream from a route that doesn't stream")
        if endpoint in ("chat", "completion"):
            assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text[-300:]
        else:  # the last event is named, and its data follows the name
            assert any(end in r.text for end in stream_ends) or '"error"' in r.text, r.text[-300:]
    else:
        assert key in r.json(), (case, r.text[:300])


def post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # The stdlib encoder: orjson can't write integers past 64 bits, which are part of the fuzz.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("chat"))
def test_generated_chat_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/chat/completions", body), "chat")


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("completion"))
def test_generated_completion_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/completions", body), "completion")


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("responses"))
def test_generated_responses_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/responses", body), "responses", endpoint="responses")


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("messages"))
def test_generated_messages_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/messages", body), "messages", endpoint="messages")


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("count_tokens"))
def test_generated_count_tokens_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/messages/count_tokens", body), "count_tokens", endpoint="count_tokens")


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy("embeddings"))
def test_generated_embeddings_bodies(http: httpx.Client, reference: str, body: dict[str, Any]) -> None:
    check(post(http, "/v1/embeddings", body), "embeddings", endpoint="embeddings")


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_generated_raw_bytes(http: httpx.Client, reference: str, raw: bytes) -> None:
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    check(r, "raw")
    assert r.status_code == 400


WRONG_TYPES = [None, True, 0, -1, 1.5, "x", [], {}, [1, "a"], {"a": {"b": []}}, 2**64]


def test_every_parameter_with_every_wrong_type(http: httpx.Client, reference: str) -> None:
    base = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for name in sorted(allowed_params("chat", LimitsConfig())):
        for value in WRONG_TYPES:
            check(post(http, "/v1/chat/completions", {**base, name: value}), "wrong-type", f"{name}={value!r}")


# A small valid body for each route after chat and completions.
BASES: dict[str, dict[str, Any]] = {
    "responses": {"model": "fast", "input": "hi", "max_output_tokens": 2},
    "messages": {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "count_tokens": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
    "embeddings": {"model": "embed", "input": "hi"},
}


@pytest.mark.parametrize("endpoint", sorted(BASES))
def test_every_parameter_with_every_wrong_type_on_the_other_routes(http: httpx.Client, reference: str,
                                                                  endpoint: str) -> None:
    for name in sorted(allowed_params(endpoint, LimitsConfig())):
        for value in WRONG_TYPES:
            check(post(http, PATHS[endpoint], {**BASES[endpoint], name: value}), f"wrong-type-{endpoint}",
                  f"{name}={value!r}", endpoint)


@pytest.mark.parametrize(("raw", "status", "words"), [
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"null", 400, "JSON object"),
    (b'{"model": "fast", "messages": [}', 400, "not valid JSON"),
    (b"\xff\xfe\x00{}", 400, "not valid JSON"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "bad \xff\xfe utf-8"}], "max_tokens": 2}',
     400, "not valid JSON"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400, ""),
    (b'{"model": "fast", "model": "auto", "messages": [{"role": "user", "content": "dup"}], "max_tokens": 1}',
     200, ""),
])
def test_malformed_bodies(http: httpx.Client, reference: str, raw: bytes, status: int, words: str) -> None:
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    check(r, "malformed")
    assert r.status_code == status, r.text
    assert words in r.text


@pytest.mark.parametrize("endpoint", sorted(BASES))
@pytest.mark.parametrize(("raw", "words"), [(b"{", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                            (b"null", "JSON object"), (b"\xff\xfe\x00{}", "not valid JSON")])
def test_malformed_bodies_on_the_other_routes(http: httpx.Client, reference: str, endpoint: str, raw: bytes,
                                              words: str) -> None:
    r = http.post(PATHS[endpoint], content=raw, headers={"content-type": "application/json"})
    check(r, "malformed", endpoint=endpoint)
    assert r.status_code == 400, r.text
    assert words in r.text


def test_huge_numbers_of_things(http: httpx.Client, reference: str) -> None:
    base = {"model": "fast", "max_tokens": 2}
    cases = [
        ({**base, "messages": [{"role": "user", "content": "x"}] * 10_000}, "messages", "array_above_max_length"),
        ({**base, "messages": [{"role": "user", "content": "x" * 300_000}]}, "messages[0].content",
         "string_above_max_length"),
        ({**base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens", None),
        ({**base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**70}, "max_tokens", None),
        ({**base, "messages": [{"role": "user", "content": "hi"}], "n": 1000}, "n", "integer_above_max_value"),
        ({**base, "messages": [{"role": "user", "content": "hi"}], "priority": -100}, "priority", None),
    ]
    for body, param, code in cases:
        r = post(http, "/v1/chat/completions", body)
        check(r, "huge")
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert code is None or error["code"] == code, error


def test_huge_numbers_of_things_on_the_other_routes(http: httpx.Client, reference: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    responses = BASES["responses"]
    messages = BASES["messages"]
    cases = [
        ("responses", {**responses, "input": [{"role": "user", "content": "x"}] * 10_000}, "input",
         "array_above_max_length"),
        ("responses", {**responses, "input": "x" * 300_000}, "input", "string_above_max_length"),
        ("responses", {**responses, "input": [{"role": "user", "content": [{"type": "input_text",
                                                                            "text": "x" * 300_000}]}]},
         "input[0].content", "string_above_max_length"),
        ("responses", {**responses, "instructions": "x" * 300_000}, "instructions", "string_above_max_length"),
        ("responses", {**responses, "max_output_tokens": -1}, "max_output_tokens", None),
        ("responses", {**responses, "max_output_tokens": 2**70}, "max_output_tokens", None),
        ("responses", {**responses, "tools": [{"type": "function", "name": "f"}] * 1000}, "tools",
         "array_above_max_length"),
        ("responses", {**responses, "priority": -100}, "priority", None),
        ("messages", {**messages, "messages": hi * 10_000}, "messages", "array_above_max_length"),
        ("messages", {**messages, "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 300_000}]}]},
         "messages[0].content", "string_above_max_length"),
        ("messages", {**messages, "system": "x" * 300_000}, "system", "string_above_max_length"),
        ("messages", {"model": "fast", "messages": hi}, "max_tokens", None),  # Anthropic's API requires it
        ("messages", {**messages, "max_tokens": 2**70}, "max_tokens", None),
        ("messages", {**messages, "tools": [{"name": "f", "input_schema": {}}] * 1000}, "tools",
         "array_above_max_length"),
        ("count_tokens", {**BASES["count_tokens"], "messages": hi * 10_000}, "messages", "array_above_max_length"),
        ("embeddings", {**BASES["embeddings"], "input": ["x"] * 10_000}, "input", "array_above_max_length"),
        ("embeddings", {**BASES["embeddings"], "input": "x" * 300_000}, "input", "string_above_max_length"),
        ("embeddings", {**BASES["embeddings"], "input": ["a", "x" * 300_000]}, "input[1]", "string_above_max_length"),
        ("embeddings", {**BASES["embeddings"], "max_tokens": 2}, "max_tokens", "unknown_parameter"),
    ]
    for endpoint, body, param, code in cases:
        r = post(http, PATHS[endpoint], body)
        check(r, "huge", param, endpoint)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith(f"{param}: "), error
        if endpoint not in ANTHROPIC_ENDPOINTS:  # Anthropic's envelope has neither `param` nor `code`
            assert error["param"] == param, error
            assert code is None or error["code"] == code, error


def test_ten_megabyte_bodies_are_refused_without_being_read(http: httpx.Client, reference: str) -> None:
    big = b'{"model": "fast", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    check(r, "10MB")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        for _ in range(160):
            yield b"a" * 65536

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    check(r, "10MB-chunked")
    assert r.status_code == 413


def raw_request(app_url: str, key: str, head_extra: str, parts: list[tuple[float, bytes]]) -> tuple[int, float]:
    """Send a request by hand, pausing before each part; (status, seconds until the answer came)."""
    url = urlparse(app_url)
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT_S) as s:
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.hostname}\r\nauthorization: Bearer {key}\r\n"
                   f"content-type: application/json\r\n{head_extra}\r\n").encode())
        start = time.monotonic()
        for delay, data in parts:
            time.sleep(delay)
            try:
                s.sendall(data)
            except OSError:
                break  # the server already answered and closed
        answer = s.recv(65536)
        took = time.monotonic() - start
    return int(answer.split(b" ", 2)[1]), took


def test_slow_uploads_are_cut_at_the_body_time_limit(app_url: str, api_key: str, http: httpx.Client,
                                                     reference: str) -> None:
    limit = 10  # limits.body_timeout_s of the test profile
    # A body that never arrives in full.
    status, took = raw_request(app_url, api_key, "content-length: 100\r\n", [(0, b'{"model": "fast"')])
    CASES[f"slow:{status}"] += 1
    assert status == 408 and took < limit + 10
    # A body that drips one byte a second for longer than the limit: no byte resets a timer, the whole upload
    # is limited.
    body = b'{"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    drip = [(0.0 if i == 0 else 1.0, body[i:i + 1]) for i in range(limit + 3)]
    status, took = raw_request(app_url, api_key, f"content-length: {len(body)}\r\n", drip)
    CASES[f"slow:{status}"] += 1
    assert status == 408 and took < limit + 10
    assert post(http, "/v1/chat/completions", REFERENCE).status_code == 200  # the app is still fine
