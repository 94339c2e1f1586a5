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

from serving.config import LimitsConfig
from serving.gateway.limits import allowed_params
from tests.conftest import auth

TIMEOUT_S = 60  # any answer slower than this is a hang (the engine generates at most a few tokens here)
CASES: Counter[str] = Counter()  # what ran, by kind and status, printed at the end
REFERENCE = {"model": "fast", "messages": [{"role": "user", "content": "The reference request"}],
             "max_tokens": 8, "temperature": 0, "seed": 7}

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
small_max_tokens = mostly(st.integers(1, 6), st.sampled_from([-3, 0, 512, 513, 10**6, 2**63, 2**64]) | json_values)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant"]),
                    st.sampled_from(["tool", "developer", "bogus"]) | json_values),
     "content": mostly(st.text(max_size=60), json_values)},
    optional={"name": json_values, "tool_calls": json_values},
)


def body_strategy(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
    """A request whose core fields are mostly well-formed, plus up to three of the parameters the server accepts
    (OpenAI's and vLLM's names, or an unknown one) with any JSON value, so that cases reach the engine as well
    as the validators. `max_tokens` is always present and mostly small, so valid cases stay quick."""
    params = sorted(allowed_params(endpoint, LimitsConfig()) - {"model", "max_tokens", "messages", "prompt"})
    required: dict[str, st.SearchStrategy[Any]] = {"model": models, "max_tokens": small_max_tokens}
    if endpoint == "chat":
        required["messages"] = mostly(st.lists(message, min_size=1, max_size=3), json_values)
    else:
        required["prompt"] = mostly(st.text(max_size=60) | st.lists(st.integers(0, 1000), min_size=1, max_size=6),
                                    st.lists(st.integers(-5, 40000), max_size=6) | json_values)
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


def check(r: httpx.Response, kind: str, case: str = "") -> None:
    """The pass criterion for one case."""
    CASES[f"{kind}:{r.status_code}"] += 1
    assert r.status_code < 500, (case, r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], str), error
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text[-300:]
    else:
        assert "choices" in r.json()


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
