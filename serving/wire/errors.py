"""One error envelope per protocol, for HTTP bodies and in-stream SSE events alike.

Inside tierserve an error is an `APIError`, and an error `Result` body is OpenAI's envelope
`{"error": {message, type, param, code}}` (`code` a string, as OpenAI sends it; vLLM puts the HTTP status
there as an int, and we translate). At the HTTP edge it is rendered in the protocol of the route
(`Protocol`): OpenAI's on the OpenAI routes, Anthropic's `{"type": "error", "error": {type, message}}` on
/v1/messages, and the Responses API's `event: error` in a Responses stream.
"""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any, Literal

import orjson

# OpenAI's `type` values by status; clients (the openai SDK) pick their exception class from the status.
# The code of a tier's 503 when its engine has died (the dispatcher counts it towards ejecting the tier).
ENGINE_DEAD = "engine_dead"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    408: "timeout",
    413: "request_too_large",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class APIError(Exception):
    """An error a client should see as-is, raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code, type_=self.type)

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def sse(self) -> bytes:
        return b"data: " + self.json() + b"\n\n"

    @classmethod
    def from_body(cls, status: int, body: bytes) -> APIError:
        """An error Result's body (our OpenAI envelope) back as an APIError, to render for another protocol."""
        try:
            error = orjson.loads(body)["error"]
            return cls(status, str(error["message"]), param=error.get("param"), code=error.get("code"),
                       type_=error.get("type"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return cls(status, body.decode(errors="replace")[:500] or HTTPStatus(status).phrase)


Protocol = Literal["openai", "anthropic", "responses"]


def protocol_of(endpoint: str) -> Protocol:
    if endpoint in ("messages", "count_tokens"):
        return "anthropic"
    return "responses" if endpoint == "responses" else "openai"


# Anthropic's error `type` by status (docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_body(exc: APIError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def render_json(exc: APIError, protocol: Protocol) -> bytes:
    """The HTTP body of an error on a route of `protocol` (the Responses API shares OpenAI's)."""
    return orjson.dumps(anthropic_body(exc)) if protocol == "anthropic" else exc.json()


def render_sse(exc: APIError, protocol: Protocol) -> bytes:
    """An in-stream error event in the stream's own protocol."""
    if protocol == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(anthropic_body(exc)) + b"\n\n"
    if protocol == "responses":
        event = {"type": "error", "code": exc.body()["error"]["code"], "message": exc.message, "param": exc.param}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
    return exc.sse()


def retry_after(seconds: float) -> dict[str, str]:
    """The `Retry-After` header for a condition that clears in `seconds`: whole seconds, rounded up, at least 1."""
    return {"retry-after": str(max(1, math.ceil(seconds)))}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code or _CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
        }
    }


def from_vllm_error(error: dict[str, Any]) -> APIError:
    """Translate vLLM's ErrorInfo (code = HTTP status as int) into our envelope."""
    try:
        status = int(error.get("code") or 500)
        HTTPStatus(status)
    except (TypeError, ValueError):
        status = 500
    message = str(error.get("message") or "engine error")
    code = None
    lowered = message.lower()
    if status == 400 and ("maximum context length" in lowered or "context length" in lowered):
        code = "context_length_exceeded"  # OpenAI's code for the same condition
    elif status == 404:
        code = "model_not_found"
    return APIError(status, message, param=error.get("param"), code=code)


def from_validation_errors(errors: list[Any], prefix: tuple[Any, ...] = ()) -> APIError:
    """A pydantic/FastAPI validation failure: 400 naming the first bad field (all of them in the message)."""
    parts = []
    first_param = None
    for err in errors:
        loc = [str(p) for p in (*prefix, *err.get("loc", ())) if p not in ("body",)]
        param = ".".join(loc) or None
        first_param = first_param or param
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{param}: {msg}" if param else msg)
    return APIError(400, "; ".join(parts) or "invalid request", param=first_param)
