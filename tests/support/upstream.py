"""A small, real OpenAI-compatible HTTP server (uvicorn, in a thread) for fast tests of the HTTP path.

It answers `/v1/chat/completions` and `/v1/completions` like vLLM does in shape: `max_tokens` content
events of one word each, the usage-only chunk when `stream_options.include_usage` is set, `[DONE]`;
404 for a model other than `model`, 401 without the expected key. It records what it received. Tests that
need a real engine put the fault proxy in front of bare vLLM instead; this one starts in well under a
second and costs no memory, so the fault matrix can run on every commit.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class StubUpstream:
    def __init__(self, model: str = "up", api_key: str | None = None, token_delay_s: float = 0.0) -> None:
        self.model = model
        self.api_key = api_key
        self.token_delay_s = token_delay_s
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []  # (headers, body)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="stub-upstream", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stub upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _app(self) -> FastAPI:
        app = FastAPI()

        async def handle(request: Request, kind: str) -> Any:
            body = await request.json()
            self.received.append((dict(request.headers), body))
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "invalid api key")
            if body.get("model") != self.model:
                return _error(404, f"The model `{body.get('model')}` does not exist.")
            n = int(body.get("max_tokens") or 4)
            if n > 1000:  # the stub's "context window"
                return _error(400, f"This model's maximum context length is 1000 tokens (asked {n})")
            words = [f"w{i}" for i in range(n)]
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            if not body.get("stream"):
                if kind == "chat":
                    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}}
                else:
                    choice = {"index": 0, "text": " ".join(words)}
                answer = {"id": "x", "object": kind, "model": self.model, "choices": [choice], "usage": usage}
                return JSONResponse(answer)

            async def events() -> AsyncIterator[bytes]:
                for word in words:
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    delta = {"delta": {"content": word}} if kind == "chat" else {"text": word}
                    chunk = {"id": "x", "model": self.model, "choices": [{"index": 0, **delta}], "usage": None}
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunk = {"id": "x", "model": self.model, "choices": [], "usage": usage}
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await handle(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await handle(request, "completion")

        return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)
