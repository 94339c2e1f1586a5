"""CPU milliseconds per streamed output token, per process group, under a fixed streaming load.

On a 2-core box every cycle the gateway spends is taken from the engine, so this is the gateway's cost in
its own unit, and far steadier between runs than a throughput ratio. Usage, against a running tierserve
(or any OpenAI-compatible server on this machine):

    python -m benchmarks.cpucost http://127.0.0.1:8000/v1 fast LABEL [API_KEY] [--concurrency 16] [--requests 96]

Prints one JSON line: tokens, wall time, tok/s, time to first token p50, and CPU ms per token for the tier
replica, ingress replica, Serve proxy, engine core, engine worker (the model's forward passes), vLLM API server,
Ray's own processes. `--idle SECONDS` sends nothing and prints each group's CPU use instead, in percent of one
core: what the server costs the engines on its node while it waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

import psutil

from benchmarks.loadgen import PromptMaker, Workload, run_level
from serving.backends.affinity import engine_cores

GROUPS = [
    ("ServeReplica:tierserve:tier-", "tier replica"),
    ("ServeReplica:tierserve:ingress", "ingress replica"),
    ("ProxyActor", "serve proxy"),
    ("EngineCore", "engine core"),
    ("VLLM::Worker", "engine worker"),
    ("vllm.entrypoints.openai.api_server", "vllm api server"),
    ("raylet", "ray system"),
    ("gcs_server", "ray system"),
    ("ServeController", "ray system"),
    ("dashboard", "ray system"),  # the dashboard head and its module processes
    ("DashboardAgent", "ray system"),
    ("RuntimeEnvAgent", "ray system"),
    ("log_monitor.py", "ray system"),
    ("autoscaler/_private/monitor.py", "ray system"),
    ("bin/serve run", "ray system"),  # `serve run`, the driver `tierserve up` starts
    ("ServeReplica", "other replicas"),
]


# Processes whose children include a vLLM engine core: Serve replicas (a tier, or the ingress embedding one) and
# vLLM's own API server.
ENGINE_PARENTS = ("ServeReplica", "vllm.entrypoints.openai.api_server")


def engine_role(proc: psutil.Process) -> str | None:
    """"engine core", "engine worker" or None, by vLLM's titles or else by process shape. vLLM's setproctitle
    sometimes does not take inside a Ray replica, and the engine's processes then carry their replica's title:
    an engine core is a child of a Serve replica or of vLLM's API server that has children of its own (its
    workers); a worker is a child of an engine core. The shape is serving/backends/affinity.py's engine_cores."""
    titled = titled_role(_title(proc))
    if titled is not None:
        return titled
    parent = proc.parent()
    if parent is not None and _is_engine_core(parent):
        return "engine worker"
    return "engine core" if _is_engine_core(proc) else None


def _is_engine_core(proc: psutil.Process) -> bool:
    titled = titled_role(_title(proc))
    if titled is not None:
        return titled == "engine core"
    parent = proc.parent()
    return parent is not None and any(m in _title(parent) for m in ENGINE_PARENTS) and proc in engine_cores(parent)


def titled_role(text: str) -> str | None:
    """The role vLLM's process title (in a command line or name) gives, if it took."""
    if "EngineCore" in text:
        return "engine core"
    if "VLLM::" in text:
        return "engine worker"
    return None


def _title(proc: psutil.Process) -> str:
    return process_title(proc.cmdline(), proc.name())


def process_title(cmdline: list[str] | None, name: str | None) -> str:
    """A process's command line and name as one text: vLLM's title may show in either."""
    return " ".join(cmdline or []) + " " + (name or "")


def cpu_by_process() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        cmd = process_title(proc.info["cmdline"], proc.info["name"])
        group = next((name for pattern, name in GROUPS if pattern in cmd), None)
        if group is None or "benchmarks.cpucost" in cmd:
            continue
        try:
            # An engine that lost vLLM's title carries its replica's: found by shape, not counted as the replica.
            group = engine_role(proc) or group
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.info["pid"]] = (group, times.user + times.system)
    return out


def spent_by_group(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per group between two readings (a process started in between counts from zero)."""
    spent: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        spent[group] = spent.get(group, 0.0) + cpu - before.get(pid, (group, 0.0))[1]
    return spent


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
    ttfts = [s.ttft for s in samples if s.error is None and s.ttft is not None]
    spent = spent_by_group(before, after)
    return {
        "tokens": tokens,
        "errors": sum(s.error is not None for s in samples),
        "wall_s": round(wall, 1),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "cpu_ms_per_token": {group: round(s * 1000 / tokens, 3) for group, s in sorted(spent.items())},
    }


async def idle(seconds: float) -> dict:
    """CPU per group while nothing is sent: background work (control loops, pollers, health checks)."""
    before = cpu_by_process()
    await asyncio.sleep(seconds)
    spent = spent_by_group(before, cpu_by_process())
    percent = {group: round(100 * s / seconds, 2) for group, s in sorted(spent.items())}
    return {"idle_s": seconds, "cpu_percent_of_core": percent}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpucost", description=__doc__.split("\n")[0])
    p.add_argument("base_url")
    p.add_argument("model")
    p.add_argument("label")
    p.add_argument("api_key", nargs="?")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--idle", type=float, metavar="SECONDS", help="measure background CPU without load instead")
    a = p.parse_args()
    if a.idle:
        print(json.dumps({"label": a.label, **asyncio.run(idle(a.idle))}))
        return
    result = asyncio.run(measure(a.base_url, a.model, a.api_key, a.requests, a.concurrency))
    print(json.dumps({"label": a.label, "concurrency": a.concurrency, **result}))


if __name__ == "__main__":
    main()
