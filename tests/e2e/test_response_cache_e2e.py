"""Cached work on the real app, seen as a client sees it: vLLM's prefix cache shared only within a team (the
engine's own hit counters), whatever `cache_salt` the client sends; and the response cache (on `coder`, for
keys that opt in) answering deterministic requests again with the same bytes, its header saying hit, miss or
bypass, never across teams, through the OpenAI and Anthropic client libraries too."""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable

import anthropic
import httpx
import openai
import pytest

from tests.conftest import App, auth, create_key
from tests.e2e.test_telemetry import engine_total, scrape, value
from tests.support.measure import measured

TIER = "coder"
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def long_prompt() -> str:
    """A prompt no other test sends (a random opening), a few of the engine's cache blocks long."""
    return f"case {secrets.token_hex(8)}: " + " ".join(f"step {i} reads file{i}.py and edits it" for i in range(15))


@pytest.fixture(scope="module")
def keys(app: App) -> dict[str, str]:
    made = {}
    for name, team, extra in [("alpha-1", "alpha", ["--response-cache"]), ("alpha-2", "alpha", []),
                              ("beta-1", "beta", ["--response-cache"]), ("beta-2", "beta", [])]:
        made[name] = create_key(app.env, app.config, "--agent", name, "--team", team, *extra)
    return made


def prefix_hits(http: httpx.Client, key: str, prompt: str, salt: str | None = None) -> tuple[float, float]:
    """(blocks' tokens found in the prefix cache, tokens looked up) by one request of `key`, from vLLM's own
    counters on the tier."""
    before = scrape(http)
    body = {"model": TIER, "prompt": prompt, "max_tokens": 1, **({"cache_salt": salt} if salt else {})}
    r = http.post("/v1/completions", json=body, headers=auth(key))
    assert r.status_code == 200 and r.headers["x-tierserve-provider"] == "local", r.text
    assert 100 < r.json()["usage"]["prompt_tokens"] < 500  # a few blocks, within the tier's context
    after = scrape(http)
    return (engine_total(after, HITS, TIER) - engine_total(before, HITS, TIER),
            engine_total(after, QUERIES, TIER) - engine_total(before, QUERIES, TIER))


def test_teams_never_share_the_prefix_cache_and_the_clients_salt_is_ignored(
    app: App, keys: dict[str, str]
) -> None:
    prompt = long_prompt()
    with httpx.Client(base_url=app.url, headers=auth(app.key), timeout=120) as http:
        first_hits, first_queries = prefix_hits(http, keys["alpha-1"], prompt)
        assert first_queries > 100 and first_hits == 0  # nobody has sent it before
        # The same team, another key, its own salt: the salt is ignored and the team's cache reused.
        team_hits, _ = prefix_hits(http, keys["alpha-2"], prompt, salt="anything")
        assert team_hits >= 0.5 * first_queries
        # Another team, even sending the salt another client chose: no hit.
        other_hits, other_queries = prefix_hits(http, keys["beta-1"], prompt, salt="anything")
        assert other_queries > 100 and other_hits == 0
        # And that team's own cache now holds it.
        beta_hits, _ = prefix_hits(http, keys["beta-2"], prompt)
        assert beta_hits >= 0.5 * other_queries
    measured(f"[cache] prefix cache, one {first_queries:.0f}-token prompt: same team {team_hits:.0f} tokens hit, "
             f"other team {other_hits:.0f}, other team's second key {beta_hits:.0f}")


def chat(key: str, app: App, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(base_url=app.url, timeout=120) as http:
        return http.post("/v1/chat/completions", json=body, headers={**auth(key), **(headers or {})})


def streamed(key: str, app: App, body: dict, headers: dict[str, str] | None = None) -> tuple[str, bytes]:
    with httpx.Client(base_url=app.url, timeout=120) as http, http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True},
            headers={**auth(key), **(headers or {})}) as r:
        assert r.status_code == 200
        return r.headers.get("x-tierserve-cache", ""), r.read()


def test_the_response_cache_replays_deterministic_answers_per_team(app: App, keys: dict[str, str]) -> None:
    question = f"summarise change {secrets.token_hex(6)}"
    body = {"model": TIER, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}
    with httpx.Client(base_url=app.url, headers=auth(app.key), timeout=60) as http:
        before = scrape(http)

    started = time.perf_counter()
    miss = chat(keys["alpha-1"], app, body)
    miss_s = time.perf_counter() - started
    assert miss.status_code == 200 and miss.headers["x-tierserve-cache"] == "miss"
    assert miss.headers["x-tierserve-provider"] == "local"
    started = time.perf_counter()
    hit = chat(keys["alpha-1"], app, body)
    hit_s = time.perf_counter() - started
    assert hit.headers["x-tierserve-cache"] == "hit" and hit.headers["x-tierserve-provider"] == "cache"
    assert hit.content == miss.content  # the same bytes: the same completion id too

    # Another team with the same request: its own miss, never alpha's answer.
    beta = chat(keys["beta-1"], app, body)
    assert beta.headers["x-tierserve-cache"] == "miss" and beta.json()["id"] != miss.json()["id"]
    # A key that did not opt in, or a request that samples: the cache does not apply.
    assert "x-tierserve-cache" not in chat(keys["alpha-2"], app, body).headers
    assert "x-tierserve-cache" not in chat(keys["alpha-1"], app, {**body, "temperature": 0.8}).headers
    # no-cache: answered fresh, and kept; the next request gets that fresh answer.
    fresh = chat(keys["alpha-1"], app, body, {"cache-control": "no-cache"})
    assert fresh.headers["x-tierserve-cache"] == "bypass" and fresh.json()["id"] != miss.json()["id"]
    assert chat(keys["alpha-1"], app, body).content == fresh.content

    # A stream is kept as its chunks and replayed byte for byte.
    state, first = streamed(keys["alpha-1"], app, body)
    assert state == "miss" and first.rstrip().endswith(b"data: [DONE]")
    state, again = streamed(keys["alpha-1"], app, body)
    assert state == "hit" and again == first

    with httpx.Client(base_url=app.url, headers=auth(app.key), timeout=60) as http:
        after = scrape(http)

    def delta(result: str) -> float:
        name = "tierserve_response_cache_lookups_total"
        return value(after, name, tier=TIER, result=result) - value(before, name, tier=TIER, result=result)

    assert (delta("hit"), delta("miss"), delta("bypass")) == (3, 3, 1)
    assert value(after, "tierserve_response_cache_entries") >= 3
    hits = value(after, "tierserve_requests_total", tier=TIER, provider="cache", endpoint="chat", status="200")
    assert hits - value(before, "tierserve_requests_total", tier=TIER, provider="cache", endpoint="chat",
                        status="200") == 3
    # The hit's own cost in the gateway: its round trip against that of GET /v1/models (auth and a small JSON
    # answer through the same proxy and ingress), medians of a few, reported rather than asserted.
    with httpx.Client(base_url=app.url, headers=auth(keys["alpha-1"]), timeout=60) as http:
        def median_ms(send: Callable[[], httpx.Response]) -> float:
            took = []
            for _ in range(9):
                started = time.perf_counter()
                assert send().status_code == 200
                took.append((time.perf_counter() - started) * 1000)
            return statistics.median(took)

        hit_ms = median_ms(lambda: http.post("/v1/chat/completions", json=body))
        models_ms = median_ms(lambda: http.get("/v1/models"))
    measured(f"[cache] response cache on {TIER}: miss {miss_s * 1000:.1f} ms, first hit {hit_s * 1000:.1f} ms; "
             f"hit median {hit_ms:.1f} ms against GET /v1/models {models_ms:.1f} ms (client round trips)")


def test_client_libraries_see_hits_openai_and_anthropic(app: App, keys: dict[str, str]) -> None:
    key = keys["beta-1"]
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": f"name file {secrets.token_hex(4)}"}]
    states, texts = [], []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model=TIER, messages=messages, temperature=0,
                                                                max_tokens=12)
        states.append(raw.headers["x-tierserve-cache"])
        texts.append(raw.parse().choices[0].message.content)
    assert states == ["miss", "hit"] and texts[0] == texts[1]

    claude = anthropic.Anthropic(base_url=app.url, api_key=key, max_retries=0)
    states, answers = [], []
    for _ in range(2):
        raw_msg = claude.messages.with_raw_response.create(model=TIER, max_tokens=12, messages=messages,
                                                           extra_body={"temperature": 0})
        states.append(raw_msg.headers["x-tierserve-cache"])
        answers.append(raw_msg.parse())
    assert states == ["miss", "hit"] and answers[0].id == answers[1].id
    assert answers[1].content[0].type == "text" and answers[1].content == answers[0].content
