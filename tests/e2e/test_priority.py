"""Priority classes come from the key, never from the body: a client's own `priority` is refused by name."""

from __future__ import annotations

import httpx

from tests.conftest import auth


def test_a_client_cannot_set_its_own_priority(app_url: str, api_key: str) -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "me first"}], "max_tokens": 2,
            "priority": -100}
    with httpx.Client(base_url=app_url, headers=auth(api_key), timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "priority"
