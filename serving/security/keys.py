"""API keys per agent: their spec, the hashed key store, authentication, and the tier and limit errors of a key.

Keys look like `ts_<key_id>_<secret>`: `key_id` is 12 public hex characters (the lookup index, safe to log),
`secret` is 32 random bytes, urlsafe base64. The store (a JSON file, 0600, replaced atomically) keeps only the
sha256 of the secret. A plain hash is enough because the secret is 256 random bits: there is no dictionary to
attack, so a slow KDF or a server pepper would add cost per request and nothing else.

Several processes share the store: `tierserve keys` writes it (under an flock, so two writers never lose each
other's change) and every ingress re-reads it when its inode/mtime/size change, checked at most once per
`reload_interval_s`, so a revocation is seen within that delay without a restart.

Nothing here imports Ray or vLLM; admission wires it (`KeyStore.authenticate`), quotas count what keys use.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.config import AppConfig, AuthConfig, AuthSettings
from serving.wire.errors import APIError, from_validation_errors, retry_after

log = logging.getLogger(__name__)

KEY_PREFIX = "ts_"
KEY_ID_RE = re.compile(r"^[0-9a-f]{12}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43,}$")  # token_urlsafe(32) is 43 characters
AGENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # also a metrics label: short and plain
FILE_VERSION = 1
ANONYMOUS_ID = "anonymous"
PriorityClass = Literal["interactive", "standard", "batch"]
# vLLM's request priority per class: lower is scheduled first.
PRIORITY_VALUE: dict[str, int] = {"interactive": -10, "standard": 0, "batch": 10}
ENV_ADMIN_ID = "env-admin"
_DUMMY_DIGEST = "0" * 64  # compared against for unknown ids, so both paths cost the same


# -- records -------------------------------------------------------------------------------------------------


class KeySpec(BaseModel):
    """What a key may do: the options of `tierserve keys create` and the body of `POST /admin/keys`.
    `tiers=None` allows every tier; None limits are unlimited."""

    model_config = ConfigDict(extra="forbid")

    agent: str
    tiers: tuple[str, ...] | None = None
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"  # UTC calendar periods, as serving/spend/ledger.py
    default_tier: str | None = None  # what `model: auto` means for this agent when no rule matches
    # Its requests' place in the tiers' engine queues (vLLM priority scheduling): interactive agents first.
    priority: PriorityClass = "standard"
    # Keys of one team share cached work (vLLM's prefix cache, the response cache) when `cache.isolation` is
    # `team`; no team: the key is a team of its own.
    team: str | None = None
    response_cache: bool = False  # its deterministic requests may be answered from the response cache

    @classmethod
    def parse(cls, body: dict[str, Any]) -> KeySpec:
        """From a JSON body: 400 naming the field."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors()) from None

    def check(self, known_tiers: Collection[str] | None = None) -> None:
        """KeyStoreError for what the types can't say: agent name, empty or unknown tiers, default tier."""
        if not AGENT_RE.match(self.agent):
            raise KeyStoreError(f"agent name {self.agent!r}: use letters, digits, '.', '_', '-' (at most 64)")
        if self.team is not None and not AGENT_RE.match(self.team):
            raise KeyStoreError(f"team name {self.team!r}: use letters, digits, '.', '_', '-' (at most 64)")
        if self.tiers is not None and not self.tiers:
            raise KeyStoreError("a key needs at least one tier (leave tiers out to allow all)")  # [] is not "all"
        if known_tiers is not None:
            named = {*(self.tiers or ()), *([self.default_tier] if self.default_tier else [])}
            unknown = sorted(named - set(known_tiers))
            if unknown:
                raise KeyStoreError(f"unknown tier(s): {', '.join(unknown)} (known: {', '.join(sorted(known_tiers))})")
        if self.default_tier and self.tiers is not None and self.default_tier not in self.tiers:
            raise KeyStoreError(f"default tier {self.default_tier} is not among the key's tiers "
                                f"({', '.join(self.tiers)})")


class KeyRecord(KeySpec):
    """One key as stored (no plaintext, ever)."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # ignore: a newer writer's fields don't break us

    id: str
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prefix: str  # `ts_<id>_...`, for display; holds no secret bits
    admin: bool = False  # admin routes only; rejected on /v1/*
    created_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def allows(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers

    def public(self) -> dict[str, Any]:
        """What `keys list`, `/v1/usage` and admin views show: everything but the hash."""
        return self.model_dump(exclude={"key_sha256"})


def anonymous_key(*, admin: bool = False) -> KeyRecord:
    """The caller when auth is disabled: every tier, no limits, no budget."""
    return KeyRecord(id=ANONYMOUS_ID, agent=ANONYMOUS_ID, key_sha256=_DUMMY_DIGEST, prefix="", admin=admin,
                     created_at=0.0)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(plaintext, key_id, secret); key_id is hex so it never contains the `_` separator."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, secret


def key_id_of(text: str) -> str:
    """The key id of an id, a `ts_<id>...` prefix or a whole key (what `keys show/revoke` accept)."""
    return text.removeprefix(KEY_PREFIX).split("_", 1)[0]


def split_key(token: str) -> tuple[str, str] | None:
    """`ts_<id>_<secret>` -> (id, secret), or None when the token does not have that shape."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX):].partition("_")
    if not sep or not KEY_ID_RE.match(key_id) or not SECRET_RE.match(secret):
        return None
    return key_id, secret


# -- errors (all OpenAI-shaped via serving.wire.errors.APIError) ------------------------------------------------------

_BEARER = {"www-authenticate": "Bearer"}
KEY_HELP = "send `Authorization: Bearer ts_<id>_<secret>` (create one with `tierserve keys create`)"


def auth_error(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers=dict(_BEARER))


class LimitError(APIError):
    """A 429 with `retry-after` (whole seconds, at least 1)."""

    def __init__(self, message: str, code: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(429, message, code=code, headers=retry_after(retry_after_s))


def check_tier(key: KeyRecord, tier: str) -> None:
    """403 when the key may not use `tier` (the resolved tier, after aliases and `auto`)."""
    if not key.allows(tier):
        allowed = ", ".join(key.tiers or ()) or "none"
        raise APIError(403, f"the key of agent {key.agent} may not use tier {tier} (allowed: {allowed})",
                       param="model", code="tier_not_allowed")


def parse_bearer(header_value: str | None) -> str:
    if not header_value or not header_value.strip():
        raise auth_error(f"Missing API key: {KEY_HELP}")
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise auth_error(f"Malformed Authorization header: {KEY_HELP}")
    return token


# -- the store ----------------------------------------------------------------------------------------------------


class KeyStoreError(Exception):
    """A key-management problem for the CLI/admin routes (unknown id, bad tier, unreadable file)."""


@dataclass
class _Loaded:
    by_id: dict[str, KeyRecord] = field(default_factory=dict)
    signature: tuple[int, int, int] | None = None  # (inode, mtime_ns, size); None: no file


def keys_file_path(auth: AuthConfig, state_dir: Path, settings: AuthSettings | None = None) -> Path:
    """TIERSERVE_KEYS_FILE, else `auth.keys_file`, else `<state_dir>/keys.json`."""
    if settings is not None and settings.keys_file is not None:
        return settings.keys_file.expanduser()
    if auth.keys_file:
        return Path(auth.keys_file).expanduser()
    return state_dir / "keys.json"


def usage_db_path(auth: AuthConfig, state_dir: Path) -> Path:
    return Path(auth.usage_db).expanduser() if auth.usage_db else state_dir / "usage.db"


class KeyStore:
    """Hashed keys in a JSON file; `authenticate` is cheap per request (a dict lookup and one sha256)."""

    def __init__(
        self,
        path: str | Path,
        clock: Callable[[], float] = time.time,
        *,
        enabled: bool = True,
        admin_key_sha256: str | None = None,
        reload_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.clock = clock  # wall clock: created_at / revoked_at, and the reload throttle
        self.enabled = enabled
        self.admin_key_sha256 = admin_key_sha256.lower() if admin_key_sha256 else None
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._loaded = _Loaded()
        if enabled:
            self._loaded = self._read()  # an unreadable file at start is fatal, not an empty store

    @classmethod
    def from_config(
        cls,
        config: AppConfig,
        state_dir: Path,
        settings: AuthSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> KeyStore:
        settings = settings if settings is not None else AuthSettings()
        return cls(
            keys_file_path(config.auth, state_dir, settings),
            clock,
            enabled=config.auth.enabled,
            admin_key_sha256=settings.admin_key_sha256,
            reload_interval_s=config.auth.reload_interval_s,
        )

    # -- reading ----------------------------------------------------------------------------------------------

    def _read(self) -> _Loaded:
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except FileNotFoundError:
            return _Loaded()
        except OSError as exc:
            raise KeyStoreError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            doc = json.loads(text)
            records = [KeyRecord.model_validate(r) for r in doc["keys"]]
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise KeyStoreError(f"{self.path}: not a tierserve key file: {type(exc).__name__}: {exc}") from None
        return _Loaded({r.id: r for r in records}, (st.st_ino, st.st_mtime_ns, st.st_size))

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def maybe_reload(self) -> bool:
        """Re-read the file if it changed; stat()s at most once per `reload_interval_s`. True if reloaded."""
        now = self.clock()
        # A clock that went backwards also triggers a check rather than stalling reloads until it catches up.
        if self._checked_at is not None and 0 <= now - self._checked_at < self.reload_interval_s:
            return False
        self._checked_at = now
        return self.reload(force=False)

    def reload(self, *, force: bool = True) -> bool:
        """Re-read now (admin `reload`). A broken file keeps the last good keys and logs, never locks all out."""
        try:
            if not force and self._signature() == self._loaded.signature:
                return False
            loaded = self._read()
        except (KeyStoreError, OSError) as exc:
            log.error("key store not reloaded, keeping %d keys: %s", len(self._loaded.by_id), exc)
            return False
        with self._lock:
            self._loaded = loaded
        log.info("key store reloaded: %d keys from %s", len(loaded.by_id), self.path)
        return True

    def get(self, key_id: str) -> KeyRecord | None:
        return self._loaded.by_id.get(key_id)

    def list(self, *, include_revoked: bool = True) -> builtins.list[KeyRecord]:
        self.maybe_reload()
        keys = sorted(self._loaded.by_id.values(), key=lambda r: (r.created_at, r.id))
        return [k for k in keys if include_revoked or not k.revoked]

    # -- authentication ---------------------------------------------------------------------------------------

    def _match(self, token: str) -> KeyRecord | None:
        parts = split_key(token)
        if parts is None:
            return None
        key_id, secret = parts
        record = self._loaded.by_id.get(key_id)
        # Always one constant-time comparison, whether or not the id exists.
        ok = hmac.compare_digest(hash_secret(secret), record.key_sha256 if record else _DUMMY_DIGEST)
        return record if ok else None

    def authenticate(self, header_value: str | None) -> KeyRecord:
        """The agent key of an `Authorization` header value, or APIError 401 (missing, malformed, unknown,
        revoked, admin key). With auth disabled: the anonymous record, whatever the header."""
        if not self.enabled:
            return anonymous_key()
        token = parse_bearer(header_value)
        if split_key(token) is None:
            raise auth_error(f"Malformed API key: {KEY_HELP}")
        self.maybe_reload()
        record = self._match(token)
        if record is None:
            raise auth_error("Invalid API key")
        if record.revoked:
            raise auth_error(f"API key {record.prefix} was revoked")
        if record.admin:
            raise auth_error("An admin key is for admin routes only; use an agent key here")
        return record

    def authenticate_admin(self, header_value: str | None) -> KeyRecord:
        """An admin key: TIERSERVE_ADMIN_KEY_SHA256 (sha256 of the whole key) or an admin record of the store.
        401 for anything else; 403 for a valid agent key. With auth disabled: an anonymous admin."""
        if not self.enabled:
            return anonymous_key(admin=True)
        token = parse_bearer(header_value)
        if self.admin_key_sha256 is not None and hmac.compare_digest(
            hashlib.sha256(token.encode()).hexdigest(), self.admin_key_sha256
        ):
            return KeyRecord(id=ENV_ADMIN_ID, agent="admin", key_sha256=self.admin_key_sha256, prefix="(env)",
                             admin=True, created_at=0.0)
        self.maybe_reload()
        record = self._match(token)
        if record is None or record.revoked:
            raise auth_error("Invalid admin key")
        if not record.admin:
            raise APIError(403, "this route needs an admin key", code="admin_key_required")
        return record

    # -- writing ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[dict[str, KeyRecord]]:
        """Read-modify-write under an flock on `<file>.lock`: concurrent writers (CLI runs, admin routes in
        several processes) each see the other's change. Yields the fresh records to mutate in place."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = dict(self._read().by_id)
            yield records
            self._write(records)
            loaded = self._read()
            with self._lock:
                self._loaded = loaded
        finally:
            os.close(fd)  # releases the flock

    def _write(self, records: dict[str, KeyRecord]) -> None:
        doc = {
            "version": FILE_VERSION,
            "note": "tierserve API keys: sha256 of each secret only; manage with `tierserve keys`",
            "keys": [r.model_dump(mode="json") for r in sorted(records.values(), key=lambda r: (r.created_at, r.id))],
        }
        # mkstemp creates the file 0600; os.replace makes readers see the old or the new file, never half.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def create(
        self, spec: KeySpec, *, admin: bool = False, known_tiers: Collection[str] | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key: (plaintext, record). The plaintext exists only in the return value; show it once."""
        spec.check(known_tiers)
        plaintext, key_id, secret = new_key()
        tiers = tuple(dict.fromkeys(spec.tiers)) if spec.tiers is not None else None
        record = KeyRecord(
            **{**spec.model_dump(), "tiers": tiers}, id=key_id, key_sha256=hash_secret(secret),
            prefix=f"{KEY_PREFIX}{key_id}_...", admin=admin, created_at=self.clock(),
        )
        with self._exclusive() as records:
            records[key_id] = record
        return plaintext, record

    def revoke(self, key_id: str | None = None, *, agent: str | None = None) -> builtins.list[KeyRecord]:
        """Revoke one key by id (or by `ts_<id>…` prefix), or every live key of an agent. Returns what changed
        (already-revoked keys are left as they were); KeyStoreError when nothing matches."""
        if (key_id is None) == (agent is None):
            raise KeyStoreError("give a key id or an agent (one of them)")
        if key_id is not None:
            key_id = key_id_of(key_id)
        now = self.clock()
        changed: builtins.list[KeyRecord] = []
        with self._exclusive() as records:
            matches = [r for r in records.values() if r.id == key_id or (agent is not None and r.agent == agent)]
            if not matches:
                raise KeyStoreError(f"no key {key_id}" if key_id is not None else f"no key for agent {agent}")
            for r in matches:
                if not r.revoked:
                    records[r.id] = r.model_copy(update={"revoked_at": now})
                    changed.append(records[r.id])
        return changed


