"""CPU milliseconds per streamed output token, per process group, under a fixed streaming load.

On a 2-core box every cycle the gateway spends is taken from the engine, so this is the gateway's cost in
its own unit, and far steadier between runs than a throughput ratio. Usage, against a running tierserve
(or any OpenAI-compatible server on this machine):

    python -m benchmarks.cpucost http://127.0.0.1:8000/v1 fast LABEL [API_KEY]

Prints one JSON line: tokens, wall time, tok/s and CPU ms per token for the tier replica, ingress replica,
Serve proxy, engine core, vLLM API server, Ray's own processes.
"""

from __future__ import annotations

import asyncio
import json
import sys

import psutil

from benchmarks.loadgen import PromptMaker, Workload, run_level

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


async def measure(base_url: str, model: str, key: str | None, requests: int = 96, concurrency: int = 16) -> dict:
    """The benchmark's own closed-loop load (`loadgen.run_level`: 64 forced output tokens, temperature 0);
    tokens are the servers' usage counts, so chunks that carry two tokens count both."""
    work = Workload(prompt_tokens=96, output_tokens=64)
    prompts = PromptMaker(None).make(work.prompt_tokens, requests + 8, seed=1)
    await run_level(base_url, model, prompts[:8], work, True, 8, key or "")  # warm-up, not counted
    before = cpu_by_process()
    samples, wall = await run_level(base_url, model, prompts[8:], work, True, concurrency, key or "")
    after = cpu_by_process()
    tokens = sum(s.output_tokens for s in samples if s.error is None)
    spent: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        spent[group] = spent.get(group, 0.0) + cpu - before.get(pid, (group, 0.0))[1]
    return {
        "tokens": tokens,
        "errors": sum(s.error is not None for s in samples),
        "wall_s": round(wall, 1),
        "tok_per_s": round(tokens / wall, 1),
        "cpu_ms_per_token": {group: round(s * 1000 / tokens, 3) for group, s in sorted(spent.items())},
    }


def main() -> None:
    base_url, model, label = sys.argv[1:4]
    key = sys.argv[4] if len(sys.argv) > 4 else None
    print(json.dumps({"label": label, **asyncio.run(measure(base_url, model, key))}))


if __name__ == "__main__":
    main()
