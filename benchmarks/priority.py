"""`python -m benchmarks.priority`: does an interactive key keep its time to first token on a saturated tier?

One tier of the tiny model with a small `engine.max_num_seqs` (default 4), API keys on, started with
`tierserve up` once per scheduling policy, one after the other (two engines on a small machine would starve
each other): `priority` (the default) and `fcfs` (the baseline: same load, the key classes ignored). On each:

1. idle: K sequential streaming chats from an `interactive` key: TTFT p50/p95;
2. saturated: B streams from a `batch` key (B > max_num_seqs, each forced to `--batch-tokens` with
   `ignore_eos`, restarted when it ends) keep requests waiting in the engine's queue; meanwhile the same number
   of sequential interactive chats (other prompts): TTFT p50/p95, the batch output tok/s of that window, and the
   engine's waiting count read from the ingress's /metrics (proof the tier really was saturated).

The result is a ratio against a baseline measured in the same run, never a timed assertion: saturated TTFT
p95 / idle TTFT p95 per policy (target <= 2.0 with `priority`), and fcfs over priority. vLLM orders only its
waiting queue by priority: running requests are not preempted, so an interactive request still waits for the
next slot to free. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report, servers
from benchmarks.cli import (
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_SERVED,
    RESULTS,
    bench_model_dir,
    check_alive,
    host_facts,
    report_ready,
    run_header,
    stop_all,
)
from benchmarks.loadgen import PromptMaker, Sample, Workload, make_client, one_request
from benchmarks.report import ms, ratio

# What each run sets: vLLM's scheduling policy, and whether the tier keeps slots from batch keys
# (tiers.<name>.slots.batch_per_replica). `slots` is what an operator turns on for interactive-first tiers.
POLICIES = ("slots", "priority", "fcfs")
ENGINE_POLICY = {"slots": "priority", "priority": "priority", "fcfs": "fcfs"}
TARGET_POLICY = "slots"
CLASSED = ("slots", "priority")  # each compared with fcfs, the baseline without classes
CLASSES = ("interactive", "batch")  # the two keys each run creates (serving/security/keys.py PRIORITY_VALUE)
TARGET_RATIO = 2.0  # saturated TTFT p95 <= 2x idle TTFT p95, for the interactive key under TARGET_POLICY
# Requests waiting: in the engine's queue, or (a batch key's, under `slots`) in the gateway for a batch slot.
QUEUE_METRICS = ("tierserve_queue_depth", "vllm:num_requests_waiting", "tierserve_batch_slots_waiting")
WAITING_FIELDS = ("s_from_window_start", "waiting")  # the raw waiting readings' columns
POLL_S = 1.0  # /metrics scrapes cost the ingress (the engine's process when embedded) CPU: about once a second
ERROR_PAUSE_S = 0.5  # a batch stream that failed restarts after this, not in a hot loop


@dataclass(frozen=True)
class Sizes:
    """The run's load, after --smoke's defaults."""

    max_num_seqs: int
    batch_streams: int
    interactive_requests: int
    batch_tokens: int
    interactive_tokens: int
    prompt_tokens: int
    warmup: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.priority", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--max-num-seqs", type=int, default=4, help="the tier's engine.max_num_seqs (default 4)")
    p.add_argument("--batch-streams", type=int, help="concurrent batch streams (default 3 x max-num-seqs; smoke 2 x)")
    p.add_argument("--interactive-requests", type=int, help="interactive requests per phase (default 20; smoke 4)")
    p.add_argument("--batch-tokens", type=int, help="output tokens forced per batch stream (default 256; smoke 64)")
    p.add_argument("--interactive-tokens", type=int, default=16, help="max_tokens of an interactive request")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of every request")
    p.add_argument("--warmup", type=int, help="interactive requests before the idle phase, not counted (default 3)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="run in order: slots (priority scheduling, batch keys held to --batch-slots), priority "
                        "(priority scheduling alone), fcfs (no classes)")
    p.add_argument("--batch-slots", type=int,
                   help="`slots`: the tier's slots.batch_per_replica (default max-num-seqs - 1)")
    p.add_argument("--smoke", action="store_true", help="a small run for CI: K=4, B=2 x seqs, batch tokens 64")
    p.add_argument("--model-dir", help="HF-format model directory (default: the tiny model, --tiny-seed)")
    p.add_argument("--tiny-seed", type=int, default=3)
    p.add_argument("--served-name", default=DEFAULT_SERVED)
    p.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--machine", help="machine label in the file names (default: host name and cores)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--workdir", help="logs, generated configs and key stores (default: a temporary directory)")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--saturation-timeout", type=float, default=120,
                   help="how long the batch load may take to get requests waiting before the window opens")
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in args.policies if x not in POLICIES]
    if bad or not args.policies or len(set(args.policies)) != len(args.policies):
        p.error(f"--policies: a list of distinct values of {', '.join(POLICIES)}")
    if args.batch_slots is None:
        args.batch_slots = args.max_num_seqs - 1
    if not 0 < args.batch_slots < args.max_num_seqs:
        p.error("--batch-slots: at least 1 and below --max-num-seqs")
    return args


def sizes(args: argparse.Namespace) -> Sizes:
    """The load: explicit flags first, then --smoke's small defaults, then the full run's."""
    seqs = args.max_num_seqs
    s = Sizes(
        max_num_seqs=seqs,
        batch_streams=args.batch_streams or (2 if args.smoke else 3) * seqs,
        interactive_requests=args.interactive_requests or (4 if args.smoke else 20),
        batch_tokens=args.batch_tokens or (64 if args.smoke else 256),
        interactive_tokens=args.interactive_tokens,
        prompt_tokens=args.prompt_tokens,
        warmup=args.warmup if args.warmup is not None else (2 if args.smoke else 3),
    )
    if min(s.max_num_seqs, s.batch_streams, s.interactive_requests, s.batch_tokens, s.interactive_tokens) <= 0:
        raise SystemExit("--max-num-seqs, --batch-streams, --interactive-requests and the token counts must be > 0")
    if s.batch_streams <= s.max_num_seqs:
        raise SystemExit(f"--batch-streams {s.batch_streams} must exceed --max-num-seqs {s.max_num_seqs}: "
                         "otherwise nothing waits and there is no queue to order")
    if s.prompt_tokens + max(s.batch_tokens, s.interactive_tokens) > args.max_model_len:
        raise SystemExit("--prompt-tokens + the output tokens exceed --max-model-len")
    return s


# -- the tier and its keys ----------------------------------------------------------------------------


def policy_config(
    model_dir: Path, served: str, max_model_len: int, max_num_seqs: int, policy: str, batch_slots: int | None = None
) -> dict:
    """The main benchmark's one-tier config (tier `bench` embedded in the ingress, profile `bench`, auth on),
    with the policy under test. No routing or fallback: every request must reach the tier's engine."""
    doc = servers.tierserve_config(model_dir, served, max_model_len, max_num_seqs, None, features=False)
    tier = doc["tiers"][servers.BENCH_TIER]
    tier["engine"]["scheduling_policy"] = ENGINE_POLICY[policy]
    if policy == "slots":
        tier["slots"] = {"batch_per_replica": batch_slots or max_num_seqs - 1}
    return doc


def policy_server(
    policy: str, model_dir: Path, args: argparse.Namespace, seqs: int, workdir: Path
) -> tuple[servers.Server, dict, dict[str, str]]:
    """`tierserve up` for one policy in its own workdir (config, state dir, keys, log), not started; the keys
    dict is filled when it starts."""
    keys: dict[str, str] = {}

    def make(_features: bool) -> dict:
        return policy_config(model_dir, args.served_name, args.max_model_len, seqs, policy, args.batch_slots)

    server, note = servers.tierserve_from(make, args.served_name, workdir / policy, features=False)
    server.name = f"tierserve-{policy}"
    cfg = Path(server.cmd[server.cmd.index("--config") + 1])
    doc = note["config"]
    # Instead of the launcher's one standard `bench` key: the two classed keys (the interactive one also
    # proves readiness).
    server.setup = lambda s: write_setup(s, doc, cfg, keys)
    return server, note, keys


def write_setup(server: servers.Server, doc: dict, cfg: Path, keys: dict[str, str]) -> None:
    """Write the config and create one key per class, before `tierserve up` starts (same env: same state dir)."""
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    for cls in CLASSES:
        keys[cls] = create_key(server.env, cfg, f"bench-{cls}", cls)
    server.api_key = keys["interactive"]


def create_key(env: dict[str, str], cfg: Path, agent: str, priority: str) -> str:
    """`tierserve keys create --priority ...` as an operator runs it; the plaintext key it prints once."""
    out = subprocess.run(
        [servers.bin_of("tierserve"), "keys", "--config", str(cfg), "--profile", "bench", "create",
         "--agent", agent, "--priority", priority],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    found = [w for w in out.stdout.split() if w.startswith("ts_")]
    if out.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"tierserve keys create --priority {priority} failed ({out.returncode}): {out.stderr}")
    return found[0]


# -- pure helpers (tests/unit/test_bench_priority.py) -------------------------------------------------


def interactive_problem(s: Sample) -> str | None:
    """Why an interactive request failed: an error, or an answer not from the tier itself (a successful answer
    of only special tokens has no TTFT but is no failure, as in the main benchmark: `no_content`)."""
    if s.error:
        return s.error
    provider = s.headers.get("x-tierserve-provider")
    if provider not in (None, "local"):
        return f"answered by {provider!r}, not the tier"
    return None


def ttft_stats(samples: list[Sample]) -> dict[str, Any]:
    """Requests, failures and TTFT p50/p95/max (ms) of the successful ones."""
    block, ttft = report.outcomes(samples, interactive_problem)
    block["ttft_ms"]["max"] = ms(max(ttft, default=None))
    return block


@dataclass(slots=True)
class BatchStream:
    """One batch request: when its content chunks came (time.perf_counter) and how it ended."""

    start: float
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from the usage chunk
    error: str | None = None
    cancelled: bool = False  # still running when the window closed: cut by us, not a failure


def tokens_in_window(streams: Iterable[BatchStream], t0: float, t1: float) -> float:
    """Output tokens the batch streams received in [t0, t1]. Streams straddle the window, so tokens are counted
    by their chunks' arrival times; a chunk may carry several tokens (or none: special tokens decode to no
    text), so each completed stream's chunks are scaled by its usage, a cut stream's by the mean of those."""
    streams = list(streams)
    scales = [x for s in streams if (x := tokens_per_chunk(s)) is not None]
    default = statistics.fmean(scales) if scales else 1.0
    total = 0.0
    for s in streams:
        inside = sum(1 for t in s.chunk_times if t0 <= t <= t1)
        if inside:
            scale = tokens_per_chunk(s)
            total += inside * (default if scale is None else scale)
    return total


def tokens_per_chunk(s: BatchStream) -> float | None:
    """A completed stream's tokens per content chunk (its usage over its chunks); None when not known."""
    if s.cancelled or s.error is not None or not s.completion_tokens or not s.chunk_times:
        return None
    return s.completion_tokens / len(s.chunk_times)


def batch_stats(streams: list[BatchStream], t0: float, t1: float) -> dict[str, Any]:
    """The batch load: streams started, completed, cut at the window's end, failed; output tok/s in the window."""
    failed = [s for s in streams if s.error is not None]
    kinds = report.error_kinds(s.error for s in failed)
    tokens = tokens_in_window(streams, t0, t1)
    window = t1 - t0
    return {
        "streams_started": len(streams),
        "completed": sum(1 for s in streams if s.error is None and not s.cancelled and s.end is not None),
        "cut_at_window_end": sum(1 for s in streams if s.cancelled),
        "errors": len(failed),
        "error_kinds": kinds,
        "window_s": round(window, 3),
        "output_tokens_in_window": round(tokens, 1),
        "output_tok_per_s": round(tokens / window, 1) if window > 0 else None,
    }


def queue_reading(text: str, tier: str) -> dict[str, float]:
    """The tier's waiting counts in an ingress /metrics text: tierserve's gauge and vLLM's own (summed over the
    tier's replicas); a family that is absent reads 0."""
    out = dict.fromkeys(QUEUE_METRICS, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out and s.labels.get("tier") == tier:
                out[s.name] += s.value
    return out


def waiting_stats(readings: list[tuple[float, float]], t0: float, t1: float, at_start: float | None) -> dict[str, Any]:
    """The waiting counts read in [t0, t1] (time, count): saturation is `observed` when one was above zero."""
    inside = [w for t, w in readings if t0 <= t <= t1]
    return {
        "metric": " / ".join(QUEUE_METRICS) + " (the larger), tier " + servers.BENCH_TIER,
        "at_window_start": at_start,
        "readings": len(inside),
        "max": max(inside, default=None),
        "mean": round(statistics.fmean(inside), 2) if inside else None,
        "share_nonzero": round(sum(1 for w in inside if w > 0) / len(inside), 3) if inside else None,
        "observed": any(w > 0 for w in inside),
    }


def policy_summary(
    warmup: dict, idle: dict, saturated: dict, batch: dict, waiting: dict, policy: str
) -> dict[str, Any]:
    """One policy's result: both phases, their ratio (the claim), the batch load and the saturation proof."""
    p95 = ratio(saturated["ttft_ms"]["p95"], idle["ttft_ms"]["p95"])
    return {
        "warmup": warmup,
        "idle": idle,
        "saturated": saturated,
        "ratio_p95": p95,
        "ratio_p50": ratio(saturated["ttft_ms"]["p50"], idle["ttft_ms"]["p50"]),
        "batch": batch,
        "waiting": waiting,
        # The target is TARGET_POLICY's; fcfs is the baseline the classed runs are compared with.
        "target_met": (p95 <= TARGET_RATIO if p95 is not None else None) if policy == TARGET_POLICY else None,
    }


def comparison(results: dict[str, dict]) -> dict[str, Any]:
    """fcfs against each classed run that ran with it: how much longer an interactive key waits without
    classes, and what the classes cost the batch load."""
    fc = results.get("fcfs")
    out: dict[str, Any] = {}
    for name in CLASSED:
        cl = results.get(name)
        if cl is None or fc is None:
            continue
        sat_fc, sat_cl = fc["saturated"]["ttft_ms"], cl["saturated"]["ttft_ms"]
        out |= {
            f"saturated_p95_fcfs_over_{name}": ratio(sat_fc["p95"], sat_cl["p95"]),
            f"saturated_p50_fcfs_over_{name}": ratio(sat_fc["p50"], sat_cl["p50"]),
            f"ratio_p95_fcfs_over_{name}": ratio(fc["ratio_p95"], cl["ratio_p95"]),
            f"batch_tok_per_s_{name}_over_fcfs": ratio(cl["batch"]["output_tok_per_s"],
                                                       fc["batch"]["output_tok_per_s"]),
        }
    return out


def failures(results: dict[str, dict]) -> list[str]:
    """Everything that makes the run fail: a request that did not succeed, a tier that never had a waiting
    request (the saturated phase measured nothing)."""
    out = []
    for policy, r in results.items():
        for phase in ("warmup", "idle", "saturated"):
            for kind, n in r[phase]["error_kinds"].items():
                out.append(f"{policy} {phase} interactive: {n} x {kind}")
        for kind, n in r["batch"]["error_kinds"].items():
            out.append(f"{policy} batch: {n} x {kind}")
        if not r["waiting"]["observed"]:
            out.append(f"{policy}: no request was seen waiting in the engine: the tier was not saturated")
    return out


# -- measuring ----------------------------------------------------------------------------------------


@dataclass
class Load:
    """What one policy's run sends."""

    url: str  # base URL ending in /v1
    metrics_url: str
    model: str
    keys: dict[str, str]
    sizes: Sizes
    warm_prompts: list[str]
    idle_prompts: list[str]
    saturated_prompts: list[str]
    batch_prompts: list[str]
    timeout_s: float
    saturation_timeout_s: float


@dataclass
class Measured:
    warmup: list[Sample]
    idle: list[Sample]
    saturated: list[Sample]
    streams: list[BatchStream]
    readings: list[tuple[float, float]]  # (perf_counter, waiting) scraped from /metrics
    window: tuple[float, float]
    waiting_at_start: float | None


async def batch_stream(client: AsyncOpenAI, model: str, prompt: str, tokens: int, rec: BatchStream) -> None:
    """One forced-length streamed chat from the batch key, its chunks timed into `rec`."""
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": tokens, "ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.usage is not None:
                rec.completion_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                rec.chunk_times.append(time.perf_counter())
        if not rec.chunk_times and not rec.completion_tokens:
            rec.error = "stream ended without a token"
    except asyncio.CancelledError:
        rec.cancelled = True
        raise
    except Exception as exc:  # every failure is data: reported, and fails the run
        rec.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        rec.end = time.perf_counter()


async def scrape(http: httpx.AsyncClient, url: str) -> float:
    r = await http.get(url)
    r.raise_for_status()
    return max(queue_reading(r.text, servers.BENCH_TIER).values())


async def interactive(client: AsyncOpenAI, load: Load, prompts: list[str]) -> list[Sample]:
    """Sequential streamed chats from the interactive key: one at a time, so each TTFT is the queue's alone."""
    work = Workload(prompt_tokens=load.sizes.prompt_tokens, output_tokens=load.sizes.interactive_tokens)
    return [await one_request(client, load.model, p, work, stream=True, want_headers=True) for p in prompts]


async def measure(load: Load, say: Callable[[str], object] = print) -> Measured:
    """Warm-up, the idle phase, then the saturated one (batch load up, waiting requests seen, interactive
    requests, batch load cut)."""
    inter = make_client(load.url, load.keys["interactive"], 1, load.timeout_s)
    batch = make_client(load.url, load.keys["batch"], load.sizes.batch_streams, load.timeout_s)
    http = httpx.AsyncClient(timeout=30, trust_env=False)
    streams: list[BatchStream] = []
    readings: list[tuple[float, float]] = []
    tasks: list[asyncio.Task[None]] = []

    async def keep_streaming(i: int) -> None:
        while True:  # until cancelled: a stream that ends is replaced at once, so the queue never drains
            rec = BatchStream(start=time.perf_counter())
            streams.append(rec)
            await batch_stream(batch, load.model, load.batch_prompts[i], load.sizes.batch_tokens, rec)
            if rec.error is not None:
                await asyncio.sleep(ERROR_PAUSE_S)

    async def poll() -> None:
        while True:
            try:
                readings.append((time.perf_counter(), await scrape(http, load.metrics_url)))
            except httpx.HTTPError as exc:
                say(f"  /metrics unreadable: {exc!r}")
            await asyncio.sleep(POLL_S)

    try:
        warmup = await interactive(inter, load, load.warm_prompts)
        say(f"  idle: {len(load.idle_prompts)} interactive requests")
        idle = await interactive(inter, load, load.idle_prompts)
        say(f"  saturated: {load.sizes.batch_streams} batch streams of {load.sizes.batch_tokens} tokens")
        tasks = [asyncio.create_task(keep_streaming(i)) for i in range(load.sizes.batch_streams)]
        at_start = await wait_waiting(http, load)
        tasks.append(asyncio.create_task(poll()))
        t0 = time.perf_counter()
        if at_start is not None:
            readings.append((t0, at_start))
        seen = f"{at_start:g} waiting" if at_start is not None else "no request seen waiting (not saturated)"
        say(f"  {seen}; {len(load.saturated_prompts)} interactive requests")
        saturated = await interactive(inter, load, load.saturated_prompts)
        t1 = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):  # the periodic readings already cover the window
            readings.append((t1, await scrape(http, load.metrics_url)))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in (inter, batch):
            await c.close()
        await http.aclose()
    return Measured(warmup, idle, saturated, streams, readings, (t0, t1), at_start)


async def wait_waiting(http: httpx.AsyncClient, load: Load) -> float | None:
    """Until the engine reports a waiting request (the count), or None after --saturation-timeout: the window
    then opens anyway and the run reports the tier as not saturated."""
    deadline = time.monotonic() + load.saturation_timeout_s
    while time.monotonic() < deadline:
        try:
            waiting = await scrape(http, load.metrics_url)
        except httpx.HTTPError:
            waiting = 0.0
        if waiting > 0:
            return waiting
        await asyncio.sleep(0.5)
    return None


def summarize(m: Measured, policy: str) -> tuple[dict, dict]:
    """(the policy's summary, its raw rows)."""
    t0, t1 = m.window
    summary = policy_summary(
        ttft_stats(m.warmup), ttft_stats(m.idle), ttft_stats(m.saturated), batch_stats(m.streams, t0, t1),
        waiting_stats(m.readings, t0, t1, m.waiting_at_start), policy,
    )  # fmt: skip
    raw = {
        "idle": report.compact([s.as_dict() for s in m.idle]),
        "saturated": report.compact([s.as_dict() for s in m.saturated]),
        "waiting": [[round(t - t0, 3), w] for t, w in m.readings],  # WAITING_FIELDS
    }
    return summary, raw


# -- the document -------------------------------------------------------------------------------------


def document(
    args: argparse.Namespace, s: Sizes, results: dict, raw: dict, configs: dict, startup: dict, started: dt.datetime,
    host: dict[str, Any], model_dir: Path,
) -> dict[str, Any]:
    doc = {
        "meta": {
            **run_header("priority", args, started, host, model_dir),
            "policies": args.policies,
            "batch_slots": args.batch_slots,
            "workload": {
                "max_num_seqs": s.max_num_seqs, "batch_streams": s.batch_streams,
                "interactive_requests": s.interactive_requests, "batch_tokens": s.batch_tokens,
                "interactive_tokens": s.interactive_tokens, "prompt_tokens": s.prompt_tokens, "warmup": s.warmup,
            },
            "startup_s": startup,
            "tierserve_config": configs,
            "noise": NOISE if (os.cpu_count() or 0) <= 4 else None,
        },
        "target": {"ratio_p95_max": TARGET_RATIO, "policy": TARGET_POLICY,
                   "met": results.get(TARGET_POLICY, {}).get("target_met")},
        "results": results,
        "comparison": comparison(results),
        "failures": failures(results),
        "raw": {"fields": report.RAW_FIELDS, "waiting_fields": WAITING_FIELDS, "policies": raw},
    }
    return doc


NOISE = (
    "this machine has few cores, shared by the engine, the gateway, the load generator and other runs; the "
    "policies run one after the other, so compare each policy's ratio against its own idle baseline, not "
    "absolute times across policies or runs."
)


def markdown(doc: dict) -> str:
    """The run's .md: setup, one row per policy, the target, fcfs against priority, failures."""
    meta, w, f = doc["meta"], doc["meta"]["workload"], report._f
    target = (f"Interactive TTFT p95 saturated / idle <= {doc['target']['ratio_p95_max']:g} with "
              f"`{doc['target']['policy']}`: "
              f"{f(doc['target']['met'])}.")  # fmt: skip
    lines = [
        f"# Priority classes benchmark {meta['date']} on {meta['machine']}",
        "",
        f"Run `{meta['command']}`, {meta['started']} → {meta['finished']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["host"].items()) + ".",
        "",
        f"Setup: `tierserve up`, one tier `{servers.BENCH_TIER}` (model {meta['served_name']}, "
        f"`engine.max_num_seqs` {w['max_num_seqs']}, embedded in the ingress, API keys on), started once per "
        f"policy ({', '.join(meta['policies'])}), one after the other; an `interactive` and a `batch` key on "
        f"each. `slots`: `engine.scheduling_policy: priority` and `slots.batch_per_replica` "
        f"{meta.get('batch_slots')}; `priority`: the scheduling policy alone; `fcfs`: no classes.",
        "",
        f"Workload: idle = {w['interactive_requests']} sequential streamed chats from the interactive key "
        f"({w['prompt_tokens']}-token prompts, {w['interactive_tokens']} output tokens) after {w['warmup']} "
        f"warm-up request(s); saturated = as many interactive chats (other prompts) while {w['batch_streams']} "
        f"batch streams of {w['batch_tokens']} forced tokens (`ignore_eos`) run, each restarted when it ends. "
        "Waiting = requests waiting (the engine's waiting count, or batch requests waiting in the gateway for a "
        "slot), read from the ingress's /metrics during that window; batch tok/s = "
        "the batch streams' output tokens in that window. Times in ms.",
        "",
        f"vLLM orders only its waiting queue: a running stream is never preempted, so under `priority` alone an "
        f"interactive request still waits for the next slot to free (up to {w['batch_tokens']} decode steps "
        "when the batch streams end together), under `fcfs` for every batch request queued before it as well; "
        "under `slots` the batch key never holds the last slots, so an interactive request finds one free.",
        "",
        *([f"> **Noise:** {meta['noise']}", ""] if meta.get("noise") else []),
        "| policy | idle TTFT p50 | p95 | saturated TTFT p50 | p95 | saturated/idle p95 | batch out tok/s "
        "| waiting seen (max, mean) | failed requests |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        *(_policy_row(p, r) for p, r in doc["results"].items()),
        "",
        *report._section("Target (reported, not asserted)", [target]),
        *report._bullets("fcfs against the classed runs", [f"{k}: {f(v, 3)}" for k, v in doc["comparison"].items()]),
        *report._bullets("Failures", doc["failures"]),
        *report._bullets("Start-up (until the first token)", [f"{n}: {f(v)} s" for n, v in meta["startup_s"].items()]),
        *report._bullets("Stop problems", meta.get("stop_problems")),
    ]
    return "\n".join(lines)


def _policy_row(policy: str, r: dict) -> str:
    f = report._f
    idle, sat, wait = r["idle"], r["saturated"], r["waiting"]
    empty = sum(r[p].get("no_content", 0) for p in ("idle", "saturated"))
    failed = sum(r[p]["errors"] for p in ("warmup", "idle", "saturated", "batch"))
    return (
        f"| {policy} | {f(idle['ttft_ms']['p50'])} | {f(idle['ttft_ms']['p95'])} | {f(sat['ttft_ms']['p50'])} | "
        f"{f(sat['ttft_ms']['p95'])} | {f(r['ratio_p95'], 2)} | {f(r['batch']['output_tok_per_s'])} | "
        f"{f(wait['observed'])} ({f(wait['max'], 0)}, {f(wait['mean'])}) | {failed}"
        + (f" ({empty} empty)" if empty else "") + " |"
    )


def write(doc: dict, out_dir: Path) -> list[Path]:
    """<date>-<machine>-priority.json (the per-request rows one phase to a line) and .md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{doc['meta']['date']}-{doc['meta']['machine']}-priority"
    body = json.dumps({k: v for k, v in doc.items() if k != "raw"}, indent=1, default=str)
    fields = {k: list(v) for k, v in doc["raw"].items() if k != "policies"}
    phases = [
        f"[{json.dumps(policy)}, {json.dumps(phase)}, {json.dumps(rows, separators=(',', ':'))}]"
        for policy, per_phase in doc["raw"]["policies"].items()
        for phase, rows in per_phase.items()
    ]
    # The per-request rows (`fields`) of the idle and saturated phases, and the waiting readings
    # (`waiting_fields`), one phase to a line.
    raw = (json.dumps(fields)[:-1] + ', "phases_as": ["policy", "phase", "rows"], "phases": [\n'
           + ",\n".join(phases) + "\n]}")  # fmt: skip
    body = body[: body.rstrip().rfind("}")].rstrip() + ',\n "raw": ' + raw + "\n}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(body + "\n")
    md_path.write_text(markdown(doc) + "\n")
    return [json_path, md_path]


# -- the run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Each policy's tierserve started, measured and stopped in turn; the files written. Exit 0; 1 when a
    request failed or the tier was never saturated; 2 when a process did not stop cleanly."""
    started = dt.datetime.now().astimezone()
    host = host_facts()
    s = sizes(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tierserve-priority-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(args.model_dir, args.tiny_seed)
    maker = PromptMaker(str(model_dir))
    k, n = s.interactive_requests, s.prompt_tokens
    prompts = {  # the same lists for every policy; each phase its own, so no phase hits another's prefix cache
        "warm": maker.make(n, s.warmup, seed=999), "idle": maker.make(n, k, seed=1),
        "saturated": maker.make(n, k, seed=2), "batch": maker.make(n, s.batch_streams, seed=3),
    }  # fmt: skip
    print(f"workdir {workdir} (logs, generated configs, key stores)", flush=True)
    engines_before = servers.engine_pids()
    results: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    startup: dict[str, float] = {}
    stop_problems: list[str] = []
    live: list[servers.Server] = []
    try:
        for policy in args.policies:
            server, note, keys = policy_server(policy, model_dir, args, s.max_num_seqs, workdir)
            configs[policy] = note["config"]
            live.append(server)  # before start(): one that fails to start is stopped too
            print(f"starting {server.name} ...", flush=True)
            server.start()
            servers.wait_ready([server], args.start_timeout, report_ready)
            startup[server.name] = round(server.ready_s or 0.0, 1)
            load = Load(
                server.base_url, f"http://{servers.LOOPBACK}:{server.port}/metrics", args.served_name, keys, s,
                prompts["warm"], prompts["idle"], prompts["saturated"], prompts["batch"], args.request_timeout,
                args.saturation_timeout,
            )  # fmt: skip
            measured = asyncio.run(measure(load))
            server.snapshot()
            check_alive([server])
            results[policy], raw[policy] = summarize(measured, policy)
            print(policy_line(policy, results[policy]), flush=True)
            stop_problems += stop_all([server], engines_before)
            live.remove(server)
    finally:
        stop_problems += stop_all(live, engines_before)
    doc = document(args, s, results, raw, configs, startup, started, host, model_dir)
    doc["meta"]["stop_problems"] = stop_problems
    for path in write(doc, Path(args.out_dir)):
        print(f"wrote {path}")
    for line in doc["failures"]:
        print(f"FAILED: {line}")
    if doc["failures"]:
        return 1
    return 0 if not stop_problems else 2


def policy_line(policy: str, r: dict) -> str:
    f = report._f
    return (
        f"{policy}: TTFT p95 idle {f(r['idle']['ttft_ms']['p95'])} ms, saturated {f(r['saturated']['ttft_ms']['p95'])} "
        f"ms (x{f(r['ratio_p95'], 2)}); batch {f(r['batch']['output_tok_per_s'])} tok/s; waiting max "
        f"{f(r['waiting']['max'], 0)}"
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
