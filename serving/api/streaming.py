"""The HTTP response for a started stream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Send

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class SSEResponse(StreamingResponse):
    """Server-sent events whose body generator is closed the moment the response ends, however it ends.

    Starlette leaves a body iterator suspended at its `yield` when the client goes away while a chunk is being
    sent; it would be finalised only when garbage-collected, and until then the engine keeps generating for
    nobody. Closing it here runs the relay's cleanup (which aborts the backend's request) at once."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.chunks = chunks

    async def stream_response(self, send: Send) -> None:
        async with contextlib.aclosing(self.chunks):
            await super().stream_response(send)
