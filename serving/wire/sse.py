"""Server-sent events as the backends and the dispatcher handle them: the end marker, error events, and the
usage that tierserve always asks for and a client that did not ask never sees."""

from __future__ import annotations

from typing import Any

DONE = b"data: [DONE]\n\n"
DONE_TEXT = DONE.decode()
_ERROR_PREFIXES = ('data: {"error"', "event: error\n")  # ours and OpenAI's; Anthropic's and the Responses API's
_ERROR_PREFIXES_BYTES = tuple(p.encode() for p in _ERROR_PREFIXES)
_DONE_EVENT = DONE.rstrip()


def is_error_event(event: bytes | str) -> bool:
    """An in-stream error, ours or an upstream's: OpenAI's chat shape (`data: {"error": ...}`), or an
    `event: error` (Anthropic Messages, the Responses API)."""
    if isinstance(event, bytes):
        return event.startswith(_ERROR_PREFIXES_BYTES)
    return event.startswith(_ERROR_PREFIXES)


def has_error_event(chunk: bytes) -> bool:
    """Whether any event of `chunk` (several events when a backend sent them together) is an error."""
    return any(is_error_event(event.lstrip(b"\n")) for event in chunk.split(b"\n\n"))


def is_done(event: bytes) -> bool:
    """The end marker (`data: [DONE]`), however the event's line ends."""
    return event.startswith(_DONE_EVENT)


def with_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the body asking for the final usage chunk, whether the client asked for it itself): budgets and metrics
    count streamed tokens too, and the usage-only chunk is dropped again for a client that didn't ask. A
    malformed `stream_options` is left as it is, for the engine or upstream to reject."""
    options = body.get("stream_options")
    client_wants = isinstance(options, dict) and bool(options.get("include_usage"))
    if options is None or isinstance(options, dict):
        body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
    return body, client_wants
