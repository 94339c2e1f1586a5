"""API keys: the hashed store, authentication errors, reload across processes, concurrent writers, per-key
rate limits, budgets and usage, redaction of logs. All with injected clocks; no Ray, no vLLM."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.cli import main
from serving.config import AppConfig, AuthConfig, AuthSettings, ModelSource, Tier
from serving.security.keys import (
    KeyRecord,
    KeySpec,
    KeyStore,
    KeyStoreError,
    LimitError,
    check_tier,
    keys_file_path,
    split_key,
    usage_db_path,
)
from serving.security.quotas import Limiter
from serving.security.redaction import RedactingFilter, auth_disabled_warning, install_redaction, redact
from serving.spend.ledger import Budget
from serving.wire.errors import APIError
from tests.support.clock import T0, Clock


def bearer(key: str) -> str:
    return f"Bearer {key}"


def app_config(**kw: object) -> AppConfig:
    tier = Tier(served_name="tiny", model=ModelSource(tiny_seed=1))
    return AppConfig.model_validate({"tiers": {"fast": tier, "coder": tier.model_copy(update={"served_name": "c"})},
                                     **kw})


def error_of(info: pytest.ExceptionInfo[APIError]) -> tuple[int, str | None, str]:
    return info.value.status, info.value.code, info.value.message


# -- the store ------------------------------------------------------------------------------------------------


def test_key_format_and_record(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json", Clock())
    plaintext, record = store.create(KeySpec(agent="coder-bot", tiers=("coder", "fast"), rpm=60, tpm=1000,
                                                 budget_usd=5, default_tier="coder"))
    key_id, secret = split_key(plaintext) or ("", "")
    assert plaintext == f"ts_{record.id}_{secret}" and key_id == record.id and len(record.id) == 12
    assert len(secret) >= 43  # 32 random bytes, urlsafe base64
    assert record.key_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert (record.agent, record.tiers, record.rpm, record.tpm, record.budget_usd, record.default_tier) == (
        "coder-bot", ("coder", "fast"), 60, 1000, 5.0, "coder")
    assert record.created_at == T0 and record.revoked_at is None and record.prefix == f"ts_{record.id}_..."
    assert "key_sha256" not in record.public()
    assert store.authenticate(bearer(plaintext)) == record


def test_key_file_never_holds_the_plaintext_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.json"
    store = KeyStore(path, Clock())
    keys = [store.create(KeySpec(agent=f"agent{i}"), admin=i == 2)[0] for i in range(3)]
    store.revoke(split_key(keys[0])[0])  # type: ignore[index]
    raw = path.read_bytes()
    for key in keys:
        _, secret = split_key(key) or ("", "")
        assert key.encode() not in raw and secret.encode() not in raw
        assert secret[:16].encode() not in raw  # not even a fragment of the secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(raw)["version"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "Missing API key"),
        ("", "Missing API key"),
        ("Basic dXNlcjpwYXNz", "Malformed Authorization header"),
        ("Bearer", "Malformed Authorization header"),
        ("Bearer a b", "Malformed Authorization header"),
        ("Bearer sk-notours", "Malformed API key"),
        ("Bearer ts_XYZ_" + "a" * 43, "Malformed API key"),
        ("Bearer ts_0123456789ab_short", "Malformed API key"),
        ("Bearer ts_0123456789ab_" + "a" * 43, "Invalid API key"),  # well-formed, unknown id
    ],
)
def test_bad_headers_are_401_with_www_authenticate(tmp_path: Path, header: str | None, fragment: str) -> None:
    store = KeyStore(tmp_path / "keys.json", Clock())
    store.create(KeySpec(agent="a"))
    with pytest.raises(APIError) as info:
        store.authenticate(header)
    assert error_of(info)[:2] == (401, "invalid_api_key") and fragment in info.value.message
    assert info.value.headers == {"www-authenticate": "Bearer"}
    body = info.value.body()["error"]
    assert body["type"] == "authentication_error" and body["code"] == "invalid_api_key"
    token = (header or "").partition(" ")[2]
    assert not token or token not in info.value.message  # never echo what was sent


def test_wrong_secret_revoked_and_admin_keys_are_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json", Clock())
    key, record = store.create(KeySpec(agent="a"))
    wrong = f"ts_{record.id}_" + "A" * 43
    with pytest.raises(APIError, match="Invalid API key"):
        store.authenticate(bearer(wrong))
    assert store.authenticate(f"bearer   {key}  ").id == record.id  # scheme is case-insensitive
    admin_key, _ = store.create(KeySpec(agent="ops"), admin=True)
    with pytest.raises(APIError, match="admin routes only") as info:
        store.authenticate(bearer(admin_key))
    assert info.value.status == 401
    store.revoke(record.id)
    with pytest.raises(APIError, match="revoked") as info:
        store.authenticate(bearer(key))
    assert error_of(info)[:2] == (401, "invalid_api_key")


def test_revocation_reaches_another_store_after_its_reload_interval(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    clock = Clock()
    server = KeyStore(path, clock, reload_interval_s=1.0)  # the ingress
    cli = KeyStore(path, clock)  # `tierserve keys` in another process
    key, record = cli.create(KeySpec(agent="a"))
    assert server.authenticate(bearer(key)).id == record.id  # the first request stat()s: sees the new key
    cli.revoke(record.id)
    clock.t += 0.4  # within the interval: no stat, the old state still answers
    assert server.authenticate(bearer(key)).id == record.id
    clock.t += 0.6
    with pytest.raises(APIError, match="revoked"):
        server.authenticate(bearer(key))


def test_new_key_is_seen_without_restart_and_stat_is_throttled(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    clock = Clock()
    server = KeyStore(path, clock, reload_interval_s=1.0)
    assert server.maybe_reload() is False  # nothing there yet
    key, _ = KeyStore(path, clock).create(KeySpec(agent="late"))
    assert server.maybe_reload() is False  # checked at T0 already: throttled
    with pytest.raises(APIError):
        server.authenticate(bearer(key))
    clock.t += 1.0
    assert server.authenticate(bearer(key)).agent == "late"
    clock.t += 5
    assert server.maybe_reload() is False  # unchanged file: stat only, no re-read


def test_broken_file_keeps_last_good_keys_but_fails_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    clock = Clock()
    server = KeyStore(path, clock)
    key, _ = server.create(KeySpec(agent="a"))
    path.write_text("{not json")
    clock.t += 2
    with caplog.at_level(logging.ERROR):
        assert server.authenticate(bearer(key)).agent == "a"
    assert "keeping 1 keys" in caplog.text
    with pytest.raises(KeyStoreError, match="not a tierserve key file"):
        KeyStore(path, clock)


def _create_many(path: str, agent: str, n: int) -> list[str]:
    store = KeyStore(path)
    return [store.create(KeySpec(agent=f"{agent}-{i}"))[0] for i in range(n)]


def test_two_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.json")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_create_many, [(path, "p", 15), (path, "q", 15)])
    store = KeyStore(path)
    assert len(store.list()) == 30
    for key in (k for keys in results for k in keys):
        store.authenticate(bearer(key))


def test_two_writer_threads_with_their_own_stores_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys: list[str] = []
    lock = threading.Lock()

    def writer(agent: str) -> None:
        made = _create_many(str(path), agent, 15)
        with lock:
            keys.extend(made)

    threads = [threading.Thread(target=writer, args=(a,)) for a in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = KeyStore(path)
    assert len(store.list()) == 45 and len(keys) == 45
    assert all(store.authenticate(bearer(k)) for k in keys)


def test_revoke_by_id_prefix_or_agent(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "keys.json", clock)
    _, r1 = store.create(KeySpec(agent="a"))
    store.create(KeySpec(agent="b"))
    store.create(KeySpec(agent="b"))
    clock.t += 10
    assert [r.id for r in store.revoke(f"ts_{r1.id}_...")] == [r1.id]  # the display prefix works too
    assert store.revoke(r1.id) == []  # already revoked: unchanged, not an error
    changed = store.revoke(agent="b")
    assert len(changed) == 2 and all(r.revoked_at == T0 + 10 for r in changed)
    assert [r.agent for r in store.list(include_revoked=False)] == []
    assert len(store.list()) == 3
    for bad in ({"key_id": "0123456789ab"}, {"agent": "nobody"}, {}, {"key_id": r1.id, "agent": "a"}):
        with pytest.raises(KeyStoreError):
            store.revoke(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"agent": "bad name"}, "agent name"),
        ({"agent": "a", "tiers": ["nope"]}, "unknown tier(s): nope"),
        ({"agent": "a", "default_tier": "nope"}, "unknown tier(s): nope"),
        ({"agent": "a", "tiers": ["fast"], "default_tier": "coder"}, "not among the key's tiers"),
        ({"agent": "a", "rpm": 0}, "rpm"),
        ({"agent": "a", "budget_usd": -1}, "budget_usd"),
        ({"agent": "a", "tiers": []}, "at least one tier"),
    ],
)
def test_create_validates(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    store = KeyStore(tmp_path / "keys.json", Clock())
    with pytest.raises((KeyStoreError, ValidationError), match=fragment.replace("(", r"\(").replace(")", r"\)")):
        store.create(KeySpec.model_validate(kwargs), known_tiers=["coder", "fast"])
    assert not (tmp_path / "keys.json").exists()


def test_auth_disabled_is_anonymous_and_warns(tmp_path: Path) -> None:
    config = app_config(auth={"enabled": False})
    store = KeyStore.from_config(config, tmp_path, AuthSettings())
    for header in (None, "garbage", "Bearer ts_0123456789ab_" + "a" * 43):
        record = store.authenticate(header)
        assert record.agent == "anonymous" and record.tiers is None and record.rpm is None
    assert store.authenticate_admin(None).admin
    warning = auth_disabled_warning(config, "10.8.0.1")
    assert warning is not None and "DISABLED" in warning and "NOT LOOPBACK" in warning
    assert "NOT LOOPBACK" not in (auth_disabled_warning(config, "127.0.0.1") or "")
    assert auth_disabled_warning(app_config()) is None
    assert app_config().auth.enabled  # secure default: on unless the file says otherwise


def test_admin_key_from_env_hash_or_store(tmp_path: Path) -> None:
    env_key = "my-admin-key-from-a-password-manager"
    settings = AuthSettings(admin_key_sha256=hashlib.sha256(env_key.encode()).hexdigest())
    store = KeyStore.from_config(app_config(), tmp_path, settings, clock=Clock())
    assert store.authenticate_admin(bearer(env_key)).id == "env-admin"
    admin_key, admin = store.create(KeySpec(agent="ops"), admin=True)
    assert store.authenticate_admin(bearer(admin_key)).id == admin.id
    agent_key, _ = store.create(KeySpec(agent="bot"))
    with pytest.raises(APIError) as info:
        store.authenticate_admin(bearer(agent_key))
    assert info.value.status == 403
    for bad in (None, "Bearer nope", bearer(admin_key[:-1] + ("x" if admin_key[-1] != "x" else "y"))):
        with pytest.raises(APIError) as info:
            store.authenticate_admin(bad)
        assert info.value.status == 401
    store.revoke(admin.id)
    with pytest.raises(APIError):
        store.authenticate_admin(bearer(admin_key))


def test_tier_permission_is_403_naming_model() -> None:
    key = KeyRecord(id="0123456789ab", agent="bot", key_sha256="0" * 64, prefix="", tiers=("fast",), created_at=0)
    check_tier(key, "fast")
    with pytest.raises(APIError) as info:
        check_tier(key, "coder")
    assert error_of(info)[:2] == (403, "tier_not_allowed") and info.value.param == "model"
    assert "coder" in info.value.message and "allowed: fast" in info.value.message
    assert info.value.body()["error"]["type"] == "permission_error"
    check_tier(key.model_copy(update={"tiers": None}), "coder")


def test_paths_precedence(tmp_path: Path) -> None:
    assert keys_file_path(AuthConfig(), tmp_path) == tmp_path / "keys.json"
    assert keys_file_path(AuthConfig(keys_file="/etc/ts/keys.json"), tmp_path) == Path("/etc/ts/keys.json")
    env = AuthSettings(keys_file=tmp_path / "env.json")
    assert keys_file_path(AuthConfig(keys_file="/etc/ts/keys.json"), tmp_path, env) == tmp_path / "env.json"
    assert usage_db_path(AuthConfig(), tmp_path) == tmp_path / "usage.db"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERSERVE_KEYS_FILE", str(tmp_path / "k.json"))
    monkeypatch.setenv("TIERSERVE_ADMIN_KEY_SHA256", "ab" * 32)
    s = AuthSettings()
    assert s.keys_file == tmp_path / "k.json" and s.admin_key_sha256 == "ab" * 32
    monkeypatch.setenv("TIERSERVE_ADMIN_KEY_SHA256", "not-a-hash")
    with pytest.raises(ValueError):
        AuthSettings()


# -- limits ---------------------------------------------------------------------------------------------------


def key(**kw: object) -> KeyRecord:
    return KeyRecord.model_validate({"id": "0123456789ab", "agent": "bot", "key_sha256": "0" * 64, "prefix": "",
                                     "created_at": 0, **kw})


def test_requests_per_minute_sliding_window() -> None:
    clock = Clock(1000.0)
    limiter = Limiter(clock)
    k = key(rpm=3)
    for dt in (0, 10, 20):
        clock.t = 1000 + dt
        limiter.check(k)
    clock.t = 1030
    with pytest.raises(LimitError) as info:
        limiter.check(k)
    assert error_of(info)[:2] == (429, "rate_limit_exceeded")
    assert info.value.retry_after_s == pytest.approx(30) and info.value.headers["retry-after"] == "30"
    assert "3 requests per minute" in info.value.message
    clock.t = 1060.5  # the first request left the window: one slot free
    limiter.check(k)
    with pytest.raises(LimitError) as info:
        limiter.check(k)
    assert info.value.retry_after_s == pytest.approx(9.5) and info.value.headers["retry-after"] == "10"
    clock.t = 1200  # all gone
    for _ in range(3):
        limiter.check(k)


def test_rejected_requests_do_not_count_and_keys_are_separate() -> None:
    clock = Clock(0.0)
    limiter = Limiter(clock)
    a, b = key(rpm=1), key(id="ba9876543210", rpm=1)
    limiter.check(a)
    for _ in range(5):
        with pytest.raises(LimitError):
            limiter.check(a)
    limiter.check(b)
    clock.t = 60.01
    limiter.check(a)  # the rejected ones didn't extend the wait


def test_tokens_per_minute() -> None:
    clock = Clock(0.0)
    limiter = Limiter(clock)
    k = key(tpm=1000)
    limiter.check(k)
    limiter.record(k, 300, 300)  # t=0: 600
    clock.t = 20
    limiter.check(k)
    limiter.record(k, 200, 300)  # t=20: 1100 in the window
    clock.t = 30
    with pytest.raises(LimitError) as info:
        limiter.check(k)
    assert error_of(info)[:2] == (429, "tokens_per_minute_exceeded")
    assert info.value.retry_after_s == pytest.approx(30)  # the t=0 batch leaves at 60: 500 < 1000
    assert "1100 tokens" in info.value.message and info.value.headers["retry-after"] == "30"
    clock.t = 60.01
    limiter.check(k)
    assert limiter.window(k) == {"seconds": 60.0, "requests": 2, "tokens": 500}


def test_unlimited_key_is_counted_but_never_refused() -> None:
    clock = Clock(0.0)
    limiter = Limiter(clock)
    k = key()
    for _ in range(1000):
        limiter.check(k)
    limiter.record_tokens(k, 10**9)
    limiter.check(k)
    assert limiter.window(k)["requests"] == 1001


def test_budget_trips_persists_and_resets_with_the_period(tmp_path: Path) -> None:
    wall = Clock()
    ledger = Budget(tmp_path / "usage.db", clock=wall, cache_s=0)
    limiter = Limiter(Clock(0.0), ledger)
    k = key(budget_usd=1.0)
    limiter.check(k)
    limiter.record(k, 1000, 500, cost_usd=0.6)
    limiter.check(k)
    limiter.record(k, 1000, 500, cost_usd=0.5)
    with pytest.raises(LimitError) as info:
        limiter.check(k)
    assert error_of(info)[:2] == (429, "budget_exceeded")
    assert "monthly budget of $1.00 spent ($1.1000)" in info.value.message
    assert "resets 2025-02-01 00:00 UTC" in info.value.message
    assert info.value.retry_after_s == pytest.approx(2 * 3600)
    ledger.close()

    # Another process (or a restart) sees the same spend.
    ledger2 = Budget(tmp_path / "usage.db", clock=wall, cache_s=0)
    limiter2 = Limiter(Clock(0.0), ledger2)
    with pytest.raises(LimitError, match="budget"):
        limiter2.check(k)
    usage = limiter2.usage(k)
    assert usage["month"]["requests"] == 2 and usage["month"]["prompt_tokens"] == 2000
    assert usage["budget"]["spent_usd"] == pytest.approx(1.1) and usage["budget"]["remaining_usd"] == 0
    # A daily budget of the same key is its own period.
    assert limiter2.check(k.model_copy(update={"budget_usd": 5.0, "budget_period": "day"})) is None
    wall.t += 2 * 3600  # February: the monthly budget is back
    limiter2.check(k)
    ledger2.close()


def test_usage_views(tmp_path: Path) -> None:
    ledger = Budget(tmp_path / "usage.db", clock=Clock(), cache_s=0)
    limiter = Limiter(Clock(0.0), ledger)
    a1, a2, b = key(), key(id="111111111111"), key(id="222222222222", agent="other", budget_usd=10)
    for k, cost in ((a1, 0.1), (a2, 0.2), (b, 1.0)):
        limiter.check(k)
        limiter.record(k, 10, 5, cost_usd=cost)
    one = limiter.usage(b)
    assert one["object"] == "usage" and one["key"]["agent"] == "other" and "key_sha256" not in one["key"]
    assert one["day"]["completion_tokens"] == 5 and one["window"]["requests"] == 1
    assert one["budget"] == {"limit_usd": 10.0, "period": "month", "spent_usd": 1.0, "remaining_usd": 9.0,
                             "resets_at": "2025-02-01T00:00:00+00:00"}
    every = limiter.usage_all([a1, a2, b])
    assert set(every["keys"]) == {a1.id, a2.id, b.id}
    assert every["agents"]["bot"]["requests"] == 2 and every["agents"]["bot"]["cost_usd"] == pytest.approx(0.3)
    assert Limiter(Clock(0.0)).usage(a1) == {"object": "usage", "key": a1.public(),
                                             "window": {"seconds": 60.0, "requests": 0, "tokens": 0}}


# -- logs -----------------------------------------------------------------------------------------------------


def test_redact() -> None:
    key = "ts_0123456789ab_" + "Ab-_" * 11
    text = (f"auth header Authorization: Bearer {key} and raw {key}; "
            'provider sk-proj-abcdefghijklmnop {"api_key": "secret123"} x-api-key=zzz')
    clean = redact(text)
    for secret in ("Ab-_Ab-_", "sk-proj-abc", "secret123", "zzz"):
        assert secret not in clean
    assert "ts_0123456789ab_[REDACTED]" in clean and "Bearer [REDACTED]" in clean
    assert redact("nothing to hide, ts_ alone, bearer-less") == "nothing to hide, ts_ alone, bearer-less"
    assert redact(f"x_{key}") == "x_ts_0123456789ab_[REDACTED]"


def test_redacting_filter_covers_args_and_tracebacks() -> None:
    key = "ts_0123456789ab_" + "x" * 43
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tierserve.test.redact")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        flt = install_redaction(logger)
        assert install_redaction(logger) is flt and isinstance(flt, RedactingFilter)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.warning("request with %s", f"Bearer {key}")
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            logger.exception("failed")
        child = logging.getLogger("tierserve.test.redact.child")
        child.error("child %s", key)  # propagates: the handler's filter still applies
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "x" * 20 not in out and out.count("[REDACTED]") >= 3 and "ValueError" in out


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_keys_lifecycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys.json"
    monkeypatch.setenv("TIERSERVE_KEYS_FILE", str(keys_file))  # the env var picks the store
    repo_models = Path(__file__).resolve().parents[2] / "models.yaml"
    base = ["keys", "--config", str(repo_models), "--state-dir", str(tmp_path / "state")]
    assert main([*base, "create", "--agent", "coder-bot", "--tiers", "coder,fast", "--rpm", "30", "--tpm", "5000",
                 "--budget-usd", "2.5", "--default-tier", "coder"]) == 0
    out, err = capsys.readouterr()
    plaintext = out.strip()
    assert split_key(plaintext) is not None and "only time" in err
    record = KeyStore(keys_file).authenticate(bearer(plaintext))
    assert (record.tiers, record.rpm, record.tpm, record.budget_usd) == (("coder", "fast"), 30, 5000, 2.5)
    assert plaintext.encode() not in keys_file.read_bytes()

    assert main([*base, "create", "--agent", "x", "--tiers", "bogus"]) == 1  # checked against models.yaml
    assert "unknown tier(s): bogus" in capsys.readouterr().err

    assert main([*base, "list"]) == 0
    listing = capsys.readouterr().out
    assert "coder-bot" in listing and record.id in listing and split_key(plaintext)[1] not in listing  # type: ignore[index]
    assert main([*base, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == record.id

    assert main([*base, "show", record.id]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["agent"] == "coder-bot" and "key_sha256" not in shown

    assert main(["keys", "--keys-file", str(keys_file), "--config", str(tmp_path / "none.yaml"), "revoke",
                 "--agent", "coder-bot"]) == 0
    assert record.id in capsys.readouterr().out
    assert main([*base, "list"]) == 0 and record.id not in capsys.readouterr().out  # revoked: hidden
    assert main([*base, "list", "--all"]) == 0 and record.id in capsys.readouterr().out
    assert main([*base, "revoke", "0123456789ab"]) == 1
    assert os.stat(keys_file).st_mode & 0o077 == 0
