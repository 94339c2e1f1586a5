"""A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1 for tests, controlled at runtime.

It runs its own asyncio loop in a daemon thread, so sync tests, async tests and subprocesses can all use
it. Every response is sent with `Connection: close`; SSE responses (chunked upstream) are re-framed one
event per chunk, which makes "cut after K events" exact.

    with FaultProxy(("127.0.0.1", upstream_port)) as proxy:
        proxy.set("status", status=500, times=3)      # the next 3 requests get a 500, then pass
        proxy.set("cut", after_chunks=2)              # stream 2 SSE events, then drop the connection
        proxy.set("refuse")                           # accept and close at once (no response)
        proxy.set("delay", delay_s=5)                 # hold the request 5 s before forwarding
        proxy.set("stall", after_chunks=1, delay_s=5) # pause 5 s after the first event
        proxy.set("sse_error", after_chunks=0)        # 200 + an in-stream error event (Anthropic "Overloaded")
        assert proxy.stats.connections == 0           # never contacted
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Self

Mode = Literal["pass", "refuse", "delay", "status", "cut", "stall", "sse_error"]
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"proxy-connection", b"te"}
_TYPES = {429: "rate_limit_error", 401: "authentication_error"}


@dataclass(frozen=True)
class Fault:
    mode: Mode = "pass"
    status: int = 500  # `status`
    retry_after: str | None = None  # `status`: a Retry-After header
    delay_s: float = 0.0  # `delay`: before forwarding; `stall`: after `after_chunks` events
    after_chunks: int = 0  # `cut`, `stall`, `sse_error`: SSE events forwarded first
    times: int | None = None  # apply to this many requests (connections for `refuse`), then pass


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic() when the whole request had arrived


@dataclass
class Stats:
    connections: int = 0  # accepted TCP connections
    requests: int = 0  # complete requests read
    forwarded: int = 0  # requests sent on to the upstream
    faults: int = 0  # requests (or connections) a fault was applied to
    seen: list[Seen] = field(default_factory=list)  # the last 100 requests


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.stats = Stats()
        self._fault = Fault()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- control (any thread) -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, mode: Mode = "pass", **options: object) -> None:
        with self._lock:
            self._fault = Fault(mode, **options)  # type: ignore[arg-type]

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def _take(self, at_connect: bool) -> Fault:
        """The fault for this connection (`refuse` only) or request (the others), counting down `times`."""
        with self._lock:
            fault = self._fault
            if fault.mode == "pass" or (fault.mode == "refuse") != at_connect:
                return Fault()
            self.stats.faults += 1
            if fault.times is not None:
                left = fault.times - 1
                self._fault = Fault() if left <= 0 else Fault(**{**fault.__dict__, "times": left})
            return fault

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._accept, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the proxy ----------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self.stats.connections += 1
        try:
            if self._take(at_connect=True).mode == "refuse":
                return  # close without reading or answering
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, headers = _parse_head(head)
        method, path, _ = request_line.split(b" ", 2)
        body = await _read_body(reader, headers, request=True)
        with self._lock:
            self.stats.requests += 1
            seen = Seen(method.decode(), path.decode(), {k.decode(): v.decode() for k, v in headers}, body,
                        time.monotonic())
            self.stats.seen = [*self.stats.seen[-99:], seen]
        fault = self._take(at_connect=False)
        if fault.mode == "status":
            await _send_error(writer, fault)
            return
        if fault.mode == "delay":
            await asyncio.sleep(fault.delay_s)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            out = [request_line]
            out += [k + b": " + v for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != b"host"]
            out += [b"Host: %s:%d" % (self.upstream[0].encode(), self.upstream[1]), b"Connection: close"]
            out += [b"Content-Length: %d" % len(body)]
            up_writer.write(b"\r\n".join(out) + b"\r\n\r\n" + body)
            await up_writer.drain()
            with self._lock:
                self.stats.forwarded += 1
            await self._relay(up_reader, writer, fault)
        finally:
            up_writer.close()

    async def _relay(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: Fault) -> None:
        status_line, headers = _parse_head(await up.readuntil(b"\r\n\r\n"))
        names = {k.lower(): v for k, v in headers}
        kept = [k + b": " + v for k, v in headers if k.lower() not in HOP_BY_HOP]
        chunked = names.get(b"transfer-encoding", b"").lower() == b"chunked"
        if not chunked:
            body = await _read_body(up, headers, request=False)
            head = [status_line, *kept, b"Content-Length: %d" % len(body), b"Connection: close"]
            # `cut` on a non-streamed body: half of it, then the connection drops.
            writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body[: len(body) // 2] if fault.mode == "cut" else body))
            await writer.drain()
            return

        writer.write(b"\r\n".join([status_line, *kept, b"Transfer-Encoding: chunked", b"Connection: close"]))
        writer.write(b"\r\n\r\n")
        await writer.drain()
        sent = 0
        buffer = b""

        async def event(data: bytes) -> bool:
            """Send one SSE event; False once the fault says stop."""
            nonlocal sent
            if fault.mode == "cut" and sent >= fault.after_chunks:
                return False
            if fault.mode == "sse_error" and sent >= fault.after_chunks:
                error = {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}
                await _chunk(writer, b"data: " + json.dumps(error).encode() + b"\n\n")
                await _chunk(writer, b"")
                return False
            if fault.mode == "stall" and sent == fault.after_chunks:
                await asyncio.sleep(fault.delay_s)
            await _chunk(writer, data)
            sent += 1
            return True

        if fault.mode in ("cut", "sse_error") and fault.after_chunks == 0 and not await event(b""):
            return
        while True:
            size_line = await up.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await up.readuntil(b"\r\n")  # no trailers from the servers we front
                break
            buffer += (await up.readexactly(size + 2))[:-2]
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                data, buffer = buffer[: end + 2], buffer[end + 2 :]
                if not await event(data):
                    return
        if buffer and not await event(buffer):
            return
        await _chunk(writer, b"")  # the terminating chunk: a complete response


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]], *, request: bool) -> bytes:
    names = {k.lower(): v for k, v in headers}
    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += (await reader.readexactly(size + 2))[:-2]
    if b"content-length" in names:
        return await reader.readexactly(int(names[b"content-length"]))
    return b"" if request else await reader.read()  # a response without length ends at EOF


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _send_error(writer: asyncio.StreamWriter, fault: Fault) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"fault proxy: injected {fault.status}",
                "type": _TYPES.get(fault.status, "server_error" if fault.status >= 500 else "invalid_request_error"),
                "param": None,
                "code": str(fault.status),
            }
        }
    ).encode()
    head = [b"HTTP/1.1 %d Injected" % fault.status, b"Content-Type: application/json"]
    if fault.retry_after is not None:
        head.append(b"Retry-After: " + fault.retry_after.encode())
    head += [b"Content-Length: %d" % len(body), b"Connection: close"]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await writer.drain()
