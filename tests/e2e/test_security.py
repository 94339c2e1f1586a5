"""API keys end to end against the real app: 401/403/429 answers, per-key usage, admin routes, revocation,
reload without restart, no plaintext key on disk or in the logs; and what listens where."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.conftest import App, auth, create_key, tierserve_cli
from tests.e2e.test_telemetry import scrape

PLAIN = "Say something about the weather today."
PRIVATE = "Quarterly numbers for project nightingale-7731"  # must never reach a log


def chat(client: httpx.Client, key: str | None, model: str = "fast", max_tokens: int = 2,
         headers: dict[str, str] | None = None, content: str = PLAIN) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return client.post("/v1/chat/completions", json=body, headers={**(auth(key) if key else {}), **(headers or {})})


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
def http(app_url: str) -> httpx.Client:
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c


def key_id(key: str) -> str:
    return key.split("_")[1]


def test_requests_without_a_valid_key_are_refused(http: httpx.Client, app: App) -> None:
    for headers, words in [
        ({}, "Missing API key"),
        ({"authorization": "Basic abc"}, "Malformed Authorization"),
        ({"authorization": "Bearer not-a-key"}, "Malformed API key"),
        ({"authorization": f"Bearer {app.key[:-4]}AAAA"}, "Invalid API key"),
        ({"authorization": f"Bearer {app.admin_key}"}, "Malformed API key"),  # admin keys are not agent keys
    ]:
        for r in (http.get("/v1/models", headers=headers), http.get("/v1/usage", headers=headers),
                  http.post("/v1/chat/completions", headers=headers, json={"model": "fast", "messages": []})):
            error = assert_error(r, 401, "invalid_api_key")
            assert words in error["message"] and r.headers["www-authenticate"] == "Bearer"
    # Health and metrics stay open: probes and Prometheus have no key (the firewall keeps them private).
    assert http.get("/health").status_code == 200
    assert http.get("/metrics").status_code == 200


def test_key_lifecycle(http: httpx.Client, app: App) -> None:
    env, config = app.env, app.config
    made: list[str] = []

    def new_key(*options: str) -> str:
        key = create_key(env, config, *options)  # the running app picks it up without a restart
        made.append(key)
        return key

    # Rate limit first: its 60 s window runs out while the rest of the test goes on.
    limited = new_key("--agent", "ratelimited", "--rpm", "2")
    assert [chat(http, limited).status_code for _ in range(2)] == [200, 200]
    r = chat(http, limited)
    error = assert_error(r, 429, "rate_limit_exceeded")
    assert "2 requests per minute" in error["message"]
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 60
    free_at = time.monotonic() + retry_after

    # Tiers and the key's default tier.
    doc = new_key("--agent", "doc-writer", "--tiers", "fast,reasoning", "--default-tier", "reasoning")
    ids = {m["id"] for m in http.get("/v1/models", headers=auth(doc)).json()["data"]}
    assert {"fast", "tiny-fast", "reasoning", "auto"} <= ids and not ids & {"coder", "tiny-coder", "code"}
    r = chat(http, doc, "auto")  # no rule matches: the key's default (the catalog's default is `fast`)
    assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "reasoning", r.text
    r = chat(http, doc, "auto", content="Fix this:\ndef f(x):\n    return x +\n")  # code -> coder, not allowed
    assert r.status_code == 200 and r.headers["x-tierserve-tier"] == "reasoning", r.text
    error = assert_error(chat(http, doc, "coder"), 403, "tier_not_allowed")
    assert error["param"] == "model" and "doc-writer" in error["message"] and "coder" in error["message"]
    assert_error(chat(http, doc, "fast", headers={"x-tierserve-tier": "coder"}), 403, "tier_not_allowed")
    assert_error(chat(http, doc, "fast", max_tokens=100_000), 400, "integer_above_max_value")
    assert chat(http, doc, "fast").status_code == 200

    # Per-key usage: exactly what this key was served.
    usage = http.get("/v1/usage", headers=auth(doc)).json()
    assert usage["key"]["agent"] == "doc-writer" and "key_sha256" not in usage["key"]
    assert usage["day"]["requests"] == 3 and usage["window"]["requests"] == 3
    assert usage["day"]["completion_tokens"] > 0
    metrics = scrape(http)
    assert metrics[("tierserve_agent_requests_total", (("agent", "doc-writer"), ("status", "200")))] == 3
    assert metrics[("tierserve_agent_requests_total", (("agent", "doc-writer"), ("status", "403")))] == 2
    assert metrics[("tierserve_agent_tokens_total", (("agent", "doc-writer"), ("kind", "completion")))] == (
        usage["day"]["completion_tokens"])

    # Budget on a local tier priced per request-second: the first answer spends it, the next is refused.
    budgeted = new_key("--agent", "budgeted", "--tiers", "reasoning", "--budget-usd", "0.5", "--budget-period", "day")
    assert chat(http, budgeted, "reasoning").status_code == 200
    r = chat(http, budgeted, "reasoning")
    error = assert_error(r, 429, "budget_exceeded")
    assert "daily budget of $0.50" in error["message"] and int(r.headers["retry-after"]) >= 1
    budget = http.get("/v1/usage", headers=auth(budgeted)).json()["budget"]
    assert budget["spent_usd"] >= 0.5 and budget["remaining_usd"] == 0 and budget["period"] == "day"
    assert scrape(http)[("tierserve_agent_cost_usd_total", (("agent", "budgeted"),))] >= 0.5

    # Tokens per minute: counted when a request ends, so the one after the limit is refused.
    tokens = new_key("--agent", "tokens", "--tpm", "10")
    r = http.post("/v1/completions", headers=auth(tokens),
                  json={"model": "fast", "prompt": "one two three", "max_tokens": 12, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] >= 10, r.text
    assert_error(chat(http, tokens), 429, "tokens_per_minute_exceeded")

    # Revoked with the CLI: refused on the next request, no restart.
    out = tierserve_cli("keys", "revoke", key_id(doc), env=env)
    assert out.returncode == 0, out.stderr
    error = assert_error(chat(http, doc), 401, "invalid_api_key")
    assert "revoked" in error["message"]

    # Admin routes: the admin key only; an agent key is 403 there and the admin key is 401 on /v1.
    admin = auth(app.admin_key)
    assert_error(http.get("/admin/usage", headers=auth(limited)), 403, "admin_key_required")
    assert_error(http.get("/admin/usage"), 401)
    assert http.post("/admin/reload", headers=admin).json()["reloaded"] == "keys"
    every = http.get("/admin/usage", headers=admin).json()
    assert every["agents"]["doc-writer"]["requests"] == 3 and key_id(budgeted) in every["keys"]
    listed = {k["agent"]: k for k in http.get("/admin/keys", headers=admin).json()["data"]}
    assert listed["doc-writer"]["revoked_at"] is not None and all("key_sha256" not in k for k in listed.values())
    assert_error(http.post("/admin/keys", headers=admin, json={"agent": 5}), 400)
    assert_error(http.post("/admin/keys", headers=admin, json={"agent": "x", "tiers": ["gpu9"]}), 400)
    r = http.post("/admin/keys", headers=admin, json={"agent": "via-admin", "tiers": ["fast"], "rpm": 100})
    assert r.status_code == 201, r.text
    made.append(r.json()["key"])
    assert chat(http, r.json()["key"], content=PRIVATE).status_code == 200
    assert http.delete(f"/admin/keys/{r.json()['id']}", headers=admin).status_code == 200
    assert_error(chat(http, r.json()["key"]), 401)
    assert_error(http.delete("/admin/keys/000000000000", headers=admin), 404)

    # Nothing on disk holds a plaintext key or its secret; nor do the logs.
    secrets_ = [k.encode() for k in made] + [k.split("_", 2)[2].encode() for k in made]
    stored = [p for p in app.state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "keys.json" for p in stored)
    for path in stored:
        data = path.read_bytes()
        assert not any(s in data for s in secrets_), f"{path} holds a plaintext key"
    for path in log_files(app):
        data = path.read_bytes()
        assert not any(s in data for s in secrets_), f"{path} holds a plaintext key"
        assert PRIVATE.encode() not in data, f"{path} holds a prompt (auth.log_prompts is off)"

    # The rate-limited key is served again once its window has passed.
    time.sleep(max(0.0, free_at - time.monotonic()) + 0.5)
    assert chat(http, limited).status_code == 200


def log_files(app: App) -> list[Path]:
    """The app's own output and every log of this Ray session (replicas, proxy, controller, engines)."""
    session = Path("/tmp/ray/session_latest/logs")
    found = [app.log_path]
    if session.exists():
        found += [p for p in session.rglob("*") if p.is_file() and p.stat().st_size < 64 << 20]
    return found


def test_admin_key_comes_from_its_sha256_only(app: App) -> None:
    """The admin key itself is never in the environment, only its hash."""
    assert hashlib.sha256(app.admin_key.encode()).hexdigest() == app.env["TIERSERVE_ADMIN_KEY_SHA256"]
    assert all(app.admin_key not in value for value in app.env.values())


# -- exposure ---------------------------------------------------------------------------------------------


def other_local_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1: loopback aliases, ::1, and every interface's."""
    found = ["127.0.0.2", "::1"]
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ip = a.address.split("%")[0]
                if ip != "127.0.0.1" and not ipaddress.ip_address(ip).is_link_local and ip not in found:
                    found.append(ip)
    return found


def test_ingress_is_reachable_only_on_its_bind_address(app_url: str, api_key: str) -> None:
    port = urlparse(app_url).port
    assert httpx.get(f"{app_url}/health", timeout=5).status_code == 200  # bound to 127.0.0.1
    tried = other_local_addresses()
    for host in tried:
        with pytest.raises(OSError) as refused:
            socket.create_connection((host, port), timeout=3).close()
        assert isinstance(refused.value, ConnectionRefusedError), (host, refused.value)
    assert len(tried) >= 2


def test_public_port_is_served_by_the_ingress_replica(app_url: str) -> None:
    """Direct ingress (issue 9): the ingress replica's own HTTP server owns the public port, so a streamed
    chunk skips the Serve proxy; the proxy sits on another loopback port."""
    port = urlparse(app_url).port
    owners = {conn.pid for conn in psutil.net_connections("inet")
              if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port}
    assert len(owners) == 1, owners
    cmdline = " ".join(psutil.Process(owners.pop()).cmdline())
    assert "ServeReplica:tierserve:ingress" in cmdline, cmdline


def test_ray_listens_on_loopback_only(app_url: str) -> None:
    """GCS, raylet, object manager, dashboard, agents, Serve controller and proxy: 127.0.0.1 only. The one
    exception is Ray Serve's inter-deployment gRPC server, which every replica binds to `[::]:0` (hard-coded in
    ray/serve/_private/replica.py, Ray 2.60); the node firewall (ansible/roles/firewall) drops it."""
    ray_pids = {p.pid: " ".join(p.cmdline()) or p.name() for p in psutil.process_iter()
                if _is_ray(p)}
    wildcard: dict[int, int] = {}
    checked = 0
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in ray_pids:
            continue
        checked += 1
        ip = ipaddress.ip_address(conn.laddr.ip)
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.is_loopback or (mapped is not None and mapped.is_loopback):
            continue
        assert ray_pids[conn.pid].startswith("ray::ServeReplica"), (ray_pids[conn.pid], conn.laddr)
        wildcard[conn.pid] = wildcard.get(conn.pid, 0) + 1
    assert checked >= 10  # the listeners of a running app were actually seen
    assert all(n == 1 for n in wildcard.values()), wildcard


def _is_ray(p: psutil.Process) -> bool:
    try:
        text = " ".join(p.cmdline()) + " " + p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(m in text for m in ("ray::", "raylet", "gcs_server", "dashboard", "serve run", "/ray/"))
