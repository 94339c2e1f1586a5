"""CPU milliseconds per streamed output token, per process group, under a fixed streaming load.

On a 2-core box every cycle the gateway spends is taken from the engine, so this is the gateway's cost in
its own unit, and far steadier between runs than a throughput ratio. Usage, against a running tierserve
(or any OpenAI-compatible server on this machine):

    python -m benchmarks.cpucost http://127.0.0.1:8000/v1/chat/completions fast LABEL [API_KEY]

Prints one JSON line: tokens, wall time, tok/s and CPU ms per token for the tier replica, ingress replica,
Serve proxy, engine core, vLLM API server, Ray's own processes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import psutil

GROUPS = [
    ("ServeReplica:tierserve:tier-", "tier replica"),
    ("ServeReplica:tierserve:ingress", "ingress replica"),
    ("ProxyActor", "serve proxy"),
    ("EngineCore", "engine core"),
    ("vllm.entrypoints.openai.api_server", "vllm api server"),
    ("raylet", "ray system"),
    ("gcs_server", "ray system"),
    ("ServeController", "ray system"),
    ("dashboard", "ray system"),
    ("ServeReplica", "other replicas"),
]


def cpu_by_process() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        group = next((name for pattern, name in GROUPS if pattern in cmd), None)
        if group is None or "benchmarks.cpucost" in cmd:
            continue
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.info["pid"]] = (group, times.user + times.system)
    return out


async def measure(url: str, model: str, key: str | None, requests: int = 96, concurrency: int = 16) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "write a function that adds two numbers " * 12}],
        "max_tokens": 64,
        "min_tokens": 64,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:

        async def one() -> int:
            tokens = 0
            async with client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    tokens += line.startswith("data: {") and '"content"' in line
            return tokens

        await asyncio.gather(*[one() for _ in range(8)])  # warm-up, not counted
        gate = asyncio.Semaphore(concurrency)

        async def gated() -> int:
            async with gate:
                return await one()

        before, start = cpu_by_process(), time.perf_counter()
        counts = await asyncio.gather(*[gated() for _ in range(requests)])
        wall, after = time.perf_counter() - start, cpu_by_process()
    tokens = sum(counts)
    spent: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        spent[group] = spent.get(group, 0.0) + cpu - before.get(pid, (group, 0.0))[1]
    return {
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "tok_per_s": round(tokens / wall, 1),
        "cpu_ms_per_token": {group: round(s * 1000 / tokens, 3) for group, s in sorted(spent.items())},
    }


def main() -> None:
    url, model, label = sys.argv[1:4]
    key = sys.argv[4] if len(sys.argv) > 4 else None
    print(json.dumps({"label": label, **asyncio.run(measure(url, model, key))}))


if __name__ == "__main__":
    main()
