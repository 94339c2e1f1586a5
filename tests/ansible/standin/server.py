"""Stand-in for the tierserve ingress on a container: answers the OpenAI-shaped requests the agent role makes.

The real appliance (Ray Serve + vLLM) is too heavy for the container test. This server listens where the
appliance would (0.0.0.0:PORT, i.e. on every interface, so only the firewall decides who reaches it),
checks the bearer key like the appliance, and reports the caller's address in X-Peer, so the test can
prove that a request travelled through the WireGuard tunnel. Standard library only.
"""

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODELS = ["tiny-coder", "tiny-reasoning", "tiny-fast"]


class Handler(BaseHTTPRequestHandler):
    keys: frozenset[str] = frozenset()

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Peer", self.client_address[0])
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.keys:
            return True
        self._send(
            401,
            {
                "error": {
                    "message": "invalid API key",
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        )
        return False

    def do_GET(self) -> None:
        if self.path in ("/health", "/health/ready"):
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            if self._authorized():
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "tierserve"} for m in MODELS],
                    },
                )
        else:
            self._send(404, {"error": {"message": "not found", "type": "not_found", "param": None, "code": "404"}})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "not found", "type": "not_found", "param": None, "code": "404"}})
            return
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._send(
            200,
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODELS[0]),
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ready"}}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def log_message(self, format: str, *args) -> None:
        print(f"{self.client_address[0]} {format % args}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keys", type=Path, required=True, help="file with one API key per line")
    args = parser.parse_args()
    Handler.keys = frozenset(k.strip() for k in args.keys.read_text().splitlines() if k.strip())
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
