"""Log redaction (API keys, bearer tokens, provider keys) and the loud warning when auth is off."""

from __future__ import annotations

import logging
import re
import traceback

from serving.config import AppConfig

# -- startup warning, logs ---------------------------------------------------------------------------------------


def auth_disabled_warning(config: AppConfig, host: str | None = None) -> str | None:
    """The text to log (WARNING, at start) when auth is off; None when it is on."""
    if config.auth.enabled:
        return None
    where = f" on {host}" if host else ""
    exposed = host is not None and host not in ("127.0.0.1", "localhost", "::1")
    return (
        "!!! tierserve: API KEYS ARE DISABLED (auth.enabled: false, profile "
        f"{config.profile}): anyone who can reach the ingress{where} can use every tier, with no rate limits "
        "or budgets. Only for the local demo; set auth.enabled: true and create keys with `tierserve keys "
        "create` before exposing it." + (" THIS ADDRESS IS NOT LOOPBACK." if exposed else "")
    )


_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<![A-Za-z0-9])(ts_[0-9a-f]{1,32})_[A-Za-z0-9_\-]+"), r"\1_[REDACTED]"),  # keeps the public id
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1[REDACTED]"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-[REDACTED]"),  # provider keys (OpenAI, Anthropic, ...)
    (re.compile(r"(?i)\b((?:x-)?api[_-]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+"), r"\1[REDACTED]"),
)


def redact(text: str) -> str:
    """`text` with API keys and bearer tokens replaced by [REDACTED] (a `ts_` key keeps its public id)."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Logging filter: redact the formatted message and any traceback. Attach it to handlers (a logger's own
    filters don't see records propagated from child loggers); `install_redaction` does that."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is the handler's problem, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add one RedactingFilter to `logger` (default: root) and each of its handlers; idempotent."""
    logger = logger if logger is not None else logging.getLogger()
    existing = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
    flt = existing or RedactingFilter()
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(flt)
    return flt


def redact_replica_logs() -> None:
    """Redaction for a Serve replica: its root logger and Ray Serve's own logger, which does not propagate."""
    for logger in (logging.getLogger(), logging.getLogger("ray.serve")):
        install_redaction(logger)
