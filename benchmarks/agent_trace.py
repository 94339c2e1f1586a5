"""`python -m benchmarks.agent_trace`: does cache-aware routing keep a coding agent's conversations on the replica
that holds their prefix?

The workload looks like coding-agent traffic. S sessions of T turns each, up to C of them at once, all from one
API key (one team: tierserve isolates the prefix cache per team). Every session shares one system prompt and one
set of tool definitions (OpenAI `tools`, sent with `tool_choice: "none"`, so no tool-call parser is involved) and
has its own task as its first user message. Each later turn appends the answer the model really returned, then a
tool-result-like user message carrying a synthetic file or test output of M tokens (seeded, the same every run),
and asks for the next step. A turn is sent only once the previous answer completed, as an agent loop does; each is
a streamed chat completion (TTFT) with a fixed output length (`ignore_eos`, `min_tokens`). No `x-session-id` is
sent: the session is the one tierserve derives from the key and the conversation's opening, which is what a
stock agent gets. After the trace, each session sends two more non-streamed turns of one token and reads
`x-tierserve-replica`: which replica its conversation lives on, and whether it stayed there.

The systems run one after the other, each on the same trace: `vllm-1` (a bare vLLM server, one engine: the
single-replica reference), `tierserve-session` and `tierserve-balance` (`tierserve up`, one tier of 2 replicas
routed by session or by Ray's power of two choices), and `litellm` (a LiteLLM proxy in front of a bare vLLM,
when litellm is installed). The prefix-cache hit rate is Δhits / Δqueries of the engines' own counters
(`vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total`), read before and after the trace and summed
over a tier's replicas.

The results are ratios measured in the same run, reported and never asserted as times: hit rate of
tierserve-session over vllm-1 (target >= 0.9: routing by session loses almost none of one engine's reuse) and
TTFT p50 of tierserve-session over tierserve-balance (target <= 0.6: a turn that finds its prefix prefills only
its new part); balance over vllm-1 for context. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import report, servers
from benchmarks.cli import (
    DEFAULT_SERVED,
    RESULTS,
    bench_model_dir,
    check_alive,
    host_facts,
    report_ready,
    run_header,
    stop_all,
)
from benchmarks.cpucost import spent_by_group
from benchmarks.loadgen import PromptMaker, Sample, Workload, make_client
from benchmarks.report import ms, ratio

SYSTEMS = ("vllm-1", "tierserve-session", "tierserve-balance", "litellm")
SMOKE_SYSTEMS = ("vllm-1", "tierserve-session")
TIERSERVE_ROUTING = {"tierserve-session": "session", "tierserve-balance": "balance"}
REPLICAS = 2  # of the tier under test
MAX_MODEL_LEN = 2048  # the tiny model's max_position_embeddings
PROMPT_BUDGET = 1700  # tokens of the last turn's prompt: room for the answer and the extra turns below 2048
EXTRA_TURNS = 2  # non-streamed, after the trace: which replica holds the session, twice to see it stays
HITS, QUERIES, PROMPT = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total"
COUNTERS = (HITS, QUERIES, PROMPT)
REPLICA_HEADER = "x-tierserve-replica"
SCRAPES_MAX = 40  # a replica whose telemetry call did not answer in time is missing from that scrape
ROW_FIELDS = ("session", "turn", "start_s", "ttft_s", "e2e_s", "output_tokens", "prompt_tokens", "error")
# (name, ratio key, bound, "max" | "min"): the targets, each measured within one run.
TARGETS = (
    ("prefix-cache hit rate tierserve-session / vllm-1", "hit_rate_session_over_vllm1", 0.9, "min"),
    ("TTFT p50 tierserve-session / tierserve-balance", "ttft_p50_session_over_balance", 0.6, "max"),
)

SYSTEM_PROMPT = (
    "You are a coding agent working in a Python repository. Read the code before you change it, make the "
    "smallest change that fixes the task, run the tests after every change and report what you did. Use the "
    "tools to read files, write files and run the tests; answer with the next step only."
)
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "file path"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Write a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the test suite, or one test file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"},
                                                        "verbose": {"type": "boolean"}}}}},
]  # fmt: skip
_MODULES = ("queue", "server", "engine", "tier", "model", "token", "request", "yaml", "json", "review")
_ACTIONS = ("Fix the failing test of", "Add type hints to", "Speed up", "Add a retry to", "Refactor")
CONTEXT = {
    "hit_rate_balance_over_vllm1": "prefix-cache hit rate tierserve-balance / vllm-1",
    "ttft_p50_balance_over_vllm1": "TTFT p50 tierserve-balance / vllm-1",
    "ttft_p50_session_over_vllm1": "TTFT p50 tierserve-session / vllm-1",
    "ttft_mean_session_over_balance": "TTFT mean tierserve-session / tierserve-balance",
}
NEXT_STEP = "What is the next step?"
EXTRA_PROMPT = "<tool_response>\nall tests passed\n</tool_response>\nSummarize."


# -- the trace (tests/unit/test_bench_agent_trace.py) --------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """The run's load, after --smoke's defaults."""

    sessions: int
    turns: int
    concurrency: int
    tool_tokens: int  # M: each tool result's synthetic output
    max_tokens: int  # each turn's answer, forced
    max_num_seqs: int
    warmup: int


@dataclass(frozen=True)
class Session:
    index: int
    task: str  # the first user message: what makes the session's opening its own
    tool_outputs: tuple[str, ...]  # one per turn after the first


@dataclass(frozen=True)
class Trace:
    system: str
    tools: list[dict[str, Any]]
    sessions: tuple[Session, ...]
    turns: int

    def messages(self, session: Session, answers: list[str], turn: int) -> list[dict[str, Any]]:
        """Turn `turn`'s (0-based) conversation: the opening, then per earlier turn its answer and the tool
        result that followed. `turn == self.turns` is the extra turn after the trace."""
        if len(answers) < turn:
            raise ValueError(f"turn {turn} needs {turn} earlier answers, got {len(answers)}")
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.system},
                                      {"role": "user", "content": session.task}]  # fmt: skip
        for j in range(turn):
            msgs.append({"role": "assistant", "content": answers[j]})
            last = j == self.turns - 1
            msgs.append({"role": "user", "content": EXTRA_PROMPT if last else session.tool_outputs[j]})
        return msgs


def tool_output(maker: PromptMaker, tokens: int, session: int, turn: int, seed: int) -> str:
    """A synthetic read_file or run_tests result of about `tokens` tokens (exactly, for its body, with a
    tokenizer), the same for the same (seed, session, turn)."""
    rng = random.Random(f"{seed}-{session}-{turn}")
    module = rng.choice(_MODULES)
    if turn % 2 == 0:
        head = f"read_file src/{module}.py:"
    else:
        head = f"run_tests tests/test_{module}.py: {rng.randint(1, 9)} failed, {rng.randint(10, 60)} passed"
    body = maker.make(tokens, 1, seed=rng.randrange(2**31))[0]
    words = body.split(" ")
    # Lines of a few words: looks like a file or a log, and tokenizes as the words do.
    lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    return f"<tool_response>\n{head}\n" + "\n".join(lines) + f"\n</tool_response>\n{NEXT_STEP}"


def build_trace(maker: PromptMaker, s: Sizes, seed: int) -> Trace:
    """S sessions: one system prompt and tool list for all, a task each, T - 1 tool results each."""
    rng = random.Random(seed)
    sessions = []
    for i in range(s.sessions):
        task = (f"{rng.choice(_ACTIONS)} src/{rng.choice(_MODULES)}.py (ticket {rng.randint(100, 999)}, session "
                f"{i}): keep the public API and run the tests.")  # fmt: skip
        outputs = tuple(tool_output(maker, s.tool_tokens, i, t, seed) for t in range(s.turns - 1))
        sessions.append(Session(i, task, outputs))
    return Trace(SYSTEM_PROMPT, TOOLS, tuple(sessions), s.turns)


class TokenCounter:
    """A conversation's prompt tokens as the tier renders it: the model's chat template (tools included) and
    tokenizer; without a tokenizer, about 3 characters a token (the tiny tokenizer's rate on JSON and code)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tok = tokenizer

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        if self.tok is None:
            return len(json.dumps([messages, tools])) // 3
        text = self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return len(self.tok.encode(text, add_special_tokens=False))


def longest_prompt(trace: Trace, count: TokenCounter, answer: str) -> int:
    """The largest prompt (tokens) of the trace's sessions, their extra turns included, with `answer` standing in
    for every answer the model will give."""
    answers = [answer] * trace.turns
    return max(count(trace.messages(sess, answers, trace.turns), trace.tools) for sess in trace.sessions)


def placeholder_answer(maker: PromptMaker, tokens: int) -> str:
    return maker.make(tokens, 1, seed=12345)[0]


# -- counters and ratios (tests/unit/test_bench_agent_trace.py) ---------------------------------------


def engine_counters(text: str, tier: str | None) -> dict[str, dict[str, float]]:
    """Per replica (label `replica`, "" for a bare vLLM), the prefix-cache and prompt-token counters in a
    /metrics text, summed over the other labels. `tier`: only samples of that tier (the ingress's text);
    None: every sample (a bare vLLM's own)."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in COUNTERS or (tier is not None and s.labels.get("tier") != tier):
                continue
            per = out.setdefault(s.labels.get("replica", ""), dict.fromkeys(COUNTERS, 0.0))
            per[s.name] += s.value
    return out


def merge_counters(readings: Iterable[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Several scrapes into one reading: each replica's counters at their largest (counters only grow)."""
    out: dict[str, dict[str, float]] = {}
    for reading in readings:
        for replica, values in reading.items():
            per = out.setdefault(replica, dict.fromkeys(COUNTERS, 0.0))
            for k, v in values.items():
                per[k] = max(per[k], v)
    return out


def hit_rate(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Δhits / Δqueries summed over the replicas read both times, and per replica its share of the prompt
    tokens. A replica read only once cannot be counted: `missing` names it."""
    both = sorted(set(before) & set(after))
    delta = {r: {k: after[r][k] - before[r][k] for k in COUNTERS} for r in both}
    hits = sum(d[HITS] for d in delta.values())
    queries = sum(d[QUERIES] for d in delta.values())
    prompt = sum(d[PROMPT] for d in delta.values())
    return {
        "hits": hits,
        "queries": queries,
        "rate": round(hits / queries, 4) if queries > 0 else None,
        "prompt_tokens": prompt,
        "per_replica": {
            r: {"prompt_tokens": d[PROMPT], "prompt_share": round(d[PROMPT] / prompt, 3) if prompt else None,
                "hits": d[HITS], "queries": d[QUERIES],
                "rate": round(d[HITS] / d[QUERIES], 4) if d[QUERIES] > 0 else None}
            for r, d in delta.items()
        },
        "missing": sorted(set(before) ^ set(after)),
    }


# Each ratio: (name, system, over system, the field both are read from).
RATIOS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("hit_rate_session_over_vllm1", "tierserve-session", "vllm-1", ("hit_rate", "rate")),
    ("ttft_p50_session_over_balance", "tierserve-session", "tierserve-balance", ("ttft_ms", "p50")),
    ("hit_rate_balance_over_vllm1", "tierserve-balance", "vllm-1", ("hit_rate", "rate")),
    ("ttft_p50_balance_over_vllm1", "tierserve-balance", "vllm-1", ("ttft_ms", "p50")),
    ("ttft_p50_session_over_vllm1", "tierserve-session", "vllm-1", ("ttft_ms", "p50")),
    ("ttft_mean_session_over_balance", "tierserve-session", "tierserve-balance", ("ttft_ms", "mean")),
)


def ratios(results: dict[str, dict]) -> dict[str, float | None]:
    """The run's ratios: each against a system measured in the same run (None when one of them did not run)."""

    def get(system: str, *path: str) -> Any:
        v: Any = results.get(system)
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    return {name: ratio(get(system, *field), get(over, *field)) for name, system, over, field in RATIOS}


def targets(rat: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each target with its measured ratio and whether it was met (None: not measured in this run)."""
    out = []
    for name, key, bound, kind in TARGETS:
        value = rat.get(key)
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        out.append({"name": name, "ratio": key, "value": value, "bound": bound, "kind": kind, "met": met})
    return out


# -- per-system summary --------------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    session: int
    turn: int  # 0-based; EXTRA turns are numbered from `turns` on
    sample: Sample
    text: str = ""


def stats(turns: list[Turn], wall_s: float) -> dict[str, Any]:
    """Requests, failures, TTFT and end-to-end latency p50/p95 (ms), output tok/s over the trace's wall time."""
    samples = [t.sample for t in turns]
    block, ttft = report.outcomes(samples)
    ok = [s for s in samples if s.error is None]
    e2e = [s.e2e for s in ok]
    out_tokens = sum(s.output_tokens for s in ok)
    # The mean too: on a small machine TTFTs can fall into two modes, and a p50 near the boundary jumps between
    # them from run to run.
    block["ttft_ms"]["mean"] = ms(statistics.fmean(ttft)) if ttft else None
    return {
        **block,
        "e2e_ms": {"p50": ms(report.pct(e2e, 50)), "p95": ms(report.pct(e2e, 95))},
        "wall_s": round(wall_s, 3),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "prompt_tokens_max": max((s.prompt_tokens or 0 for s in ok), default=None),
    }


def ttft_by_turn(turns: list[Turn], n: int) -> list[float | None]:
    """TTFT p50 (ms) of each turn index 0..n-1 over the sessions."""
    out = []
    for i in range(n):
        vals = [t.sample.ttft for t in turns if t.turn == i and t.sample.error is None and t.sample.ttft is not None]
        out.append(ms(report.pct(vals, 50)))
    return out


def stickiness(extra: list[Turn]) -> dict[str, Any]:
    """Which replica answered each session's extra turns: a session sticks when all of them came from one
    replica. None where the system names no replica (a bare vLLM)."""
    per: dict[int, list[str | None]] = {}
    for t in extra:
        per.setdefault(t.session, []).append(t.sample.headers.get(REPLICA_HEADER))
    named = {s: r for s, r in per.items() if all(r)}
    if not named:
        return {"sessions": len(per), "named": 0, "sticky": None, "per_replica": {}, "replicas": {}}
    sticky = sum(1 for r in named.values() if len(set(r)) == 1)
    by_replica: dict[str, int] = {}
    for r in named.values():
        if len(set(r)) == 1:
            key = str(r[0])
            by_replica[key] = by_replica.get(key, 0) + 1
    return {"sessions": len(per), "named": len(named), "sticky": sticky, "per_replica": by_replica,
            "replicas": {str(s): r for s, r in sorted(named.items())}}  # fmt: skip


def prompt_tokens_by_replica(turns: list[Turn], sticky: dict[str, Any]) -> dict[str, int]:
    """The trace's prompt tokens (usage) of the sessions whose extra turns all landed on one replica, summed per
    that replica: equal to the replica's own Δ`vllm:prompt_tokens_total` when every turn of those sessions
    was served there as well (the streamed turns carry no replica header)."""
    home = {int(sess): r[0] for sess, r in sticky["replicas"].items() if len(set(r)) == 1}
    out: dict[str, int] = {}
    for t in turns:
        if t.session in home and t.sample.error is None:
            out[home[t.session]] = out.get(home[t.session], 0) + (t.sample.prompt_tokens or 0)
    return out


def failures(results: dict[str, dict], expected: dict[str, int]) -> list[str]:
    """What makes the run fail: a request that did not succeed, counters that could not be read."""
    out = []
    for name, r in results.items():
        for phase in ("turns", "extra"):
            for kind, n in r[phase]["error_kinds"].items():
                out.append(f"{name} {phase}: {n} x {kind}")
        hr = r["hit_rate"]
        if hr["rate"] is None:
            out.append(f"{name}: no prefix-cache queries counted (counters unread or prefix caching off)")
        if hr["missing"] or len(hr["per_replica"]) < expected.get(name, 1):
            out.append(f"{name}: engine counters read for {sorted(hr['per_replica'])} of {expected.get(name, 1)} "
                       f"replica(s) (missing before or after: {hr['missing']})")  # fmt: skip
    return out


# -- sending -------------------------------------------------------------------------------------------


async def chat_turn(
    client: AsyncOpenAI, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tokens: int,
    stream: bool,
) -> tuple[Sample, str]:
    """One chat completion of exactly `tokens` output tokens: its timing (as loadgen.one_request times a
    single-prompt one) and the answer's text."""
    kwargs: dict[str, Any] = {
        "model": model, "messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": tokens,
        "temperature": 0.0, "seed": 0, "extra_body": Workload(output_tokens=tokens).body_extras(),
    }  # fmt: skip
    s = Sample(start=time.perf_counter())
    text: list[str] = []
    try:
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            resp = raw.parse()
            s.end = time.perf_counter()
            s.headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-")}
            if resp.usage:
                s.output_tokens, s.prompt_tokens = resp.usage.completion_tokens, resp.usage.prompt_tokens
            return s, (resp.choices[0].message.content or "") if resp.choices else ""
        kwargs["stream_options"] = {"include_usage": True}
        raw = await client.chat.completions.with_raw_response.create(stream=True, **kwargs)
        s.headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-")}
        async for chunk in raw.parse():
            if chunk.usage is not None:
                s.output_tokens, s.prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                if s.ttft is None:
                    s.ttft = time.perf_counter() - s.start
                s.chunks += 1
                text.append(chunk.choices[0].delta.content)
        s.end = time.perf_counter()
        if s.ttft is None and s.output_tokens == 0:
            s.error = "stream ended without a token"
    except Exception as exc:  # every failure is data: counted, and fails the run
        s.end = time.perf_counter()
        s.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return s, "".join(text)


@dataclass
class Target:
    """One system as the load generator sees it."""

    name: str
    url: str  # base URL ending in /v1
    api_key: str
    metrics_url: str
    tier: str | None  # filter of the ingress's /metrics; None: a bare vLLM's own
    replicas: int


def cpu_split(
    window_s: float, busy_s: float, system: dict[str, float], load_generator_s: float, cores: int
) -> dict[str, Any]:
    """Where the machine's busy CPU seconds of a window went: the system's engines and the rest of its processes,
    this load generator, and everything else (other runs on a shared machine, the usual cause of one system's
    times being off against another's)."""
    engine, other = system.get("engine", 0.0), system.get("gateway", 0.0)
    outside = max(0.0, busy_s - engine - other - load_generator_s)
    return {
        "window_s": round(window_s, 3),
        "machine_busy_pct": round(100 * busy_s / (window_s * cores), 1) if window_s > 0 and cores else None,
        "engine_s": round(engine, 2),
        "system_other_s": round(other, 2),
        "load_generator_s": round(load_generator_s, 2),
        "outside_s": round(outside, 2),
        "outside_cores": round(outside / window_s, 2) if window_s > 0 else None,
    }


@dataclass
class CpuWindow:
    """CPU readings around the trace: the machine's, the system's process trees', this process's."""

    started: list[servers.Server]
    t0: float = 0.0
    busy0: float = 0.0
    trees0: dict[int, tuple[str, float]] = field(default_factory=dict)
    self0: float = 0.0

    def start(self) -> None:
        self.t0, self.busy0, self.trees0, self.self0 = time.monotonic(), _busy(), self._trees(), _own_cpu()

    def stop(self) -> dict[str, Any]:
        return cpu_split(time.monotonic() - self.t0, _busy() - self.busy0, spent_by_group(self.trees0, self._trees()),
                         _own_cpu() - self.self0, psutil.cpu_count() or 1)  # fmt: skip

    def _trees(self) -> dict[int, tuple[str, float]]:
        return {pid: v for srv in self.started for pid, v in srv.tree_cpu().items()}


def _busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


@dataclass
class Measured:
    cpu: dict[str, Any] | None = None
    turns: list[Turn] = field(default_factory=list)
    extra: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)


async def read_counters(
    http: httpx.AsyncClient, t: Target, want: Iterable[str] | None, timeout_s: float = 120
) -> dict[str, dict[str, float]]:
    """The engines' counters: scraped until every replica of `want` (or `t.replicas` of them) has been seen,
    SCRAPES_MAX times or `timeout_s` at most (what was seen is returned; hit_rate reports what is missing)."""
    wanted = set(want or ())
    readings: list[dict[str, dict[str, float]]] = []
    deadline = time.monotonic() + timeout_s
    for _ in range(SCRAPES_MAX):
        try:
            r = await http.get(t.metrics_url)
            r.raise_for_status()
            readings.append(engine_counters(r.text, t.tier))
        except httpx.HTTPError:
            pass
        seen = set(merge_counters(readings))
        if (wanted and wanted <= seen) or (not wanted and len(seen) >= t.replicas):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return merge_counters(readings)


async def measure(t: Target, trace: Trace, s: Sizes, model: str, timeout_s: float, warm: list[str],
                  cpu: CpuWindow | None = None, say: Callable[[str], object] = print) -> Measured:  # fmt: skip
    """Warm-up, counters, the trace (C sessions at a time, each turn after the last), counters, extra turns."""
    client = make_client(t.url, t.api_key, s.concurrency, timeout_s)
    http = httpx.AsyncClient(timeout=30, trust_env=False)
    m = Measured()
    answers: dict[int, list[str]] = {x.index: [] for x in trace.sessions}
    try:
        # Unrelated prompts of the trace's lengths, without tools: they share no cache block with the trace, and
        # the engines' first requests of each size (slower) come before the measurement.
        for prompt in warm:
            await chat_turn(client, model, [{"role": "user", "content": prompt}], [], 4, stream=True)
        m.before = await read_counters(http, t, None)
        say(f"  counters read for replica(s) {sorted(m.before) or '-'}; trace of {len(trace.sessions)} sessions "
            f"x {trace.turns} turns, {s.concurrency} at a time")  # fmt: skip
        gate = asyncio.Semaphore(s.concurrency)

        async def session(sess: Session) -> None:
            async with gate:
                for k in range(trace.turns):
                    msgs = trace.messages(sess, answers[sess.index], k)
                    sample, text = await chat_turn(client, model, msgs, trace.tools, s.max_tokens, stream=True)
                    m.turns.append(Turn(sess.index, k, sample, text))
                    answers[sess.index].append(text)

        if cpu is not None:
            cpu.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(session(x) for x in trace.sessions))
        m.wall_s = time.perf_counter() - t0
        if cpu is not None:
            m.cpu = cpu.stop()
        m.after = await read_counters(http, t, m.before)

        async def extra(sess: Session) -> None:
            async with gate:
                msgs = trace.messages(sess, answers[sess.index], trace.turns)
                for k in range(EXTRA_TURNS):
                    sample, _ = await chat_turn(client, model, msgs, trace.tools, 1, stream=False)
                    m.extra.append(Turn(sess.index, trace.turns + k, sample))

        await asyncio.gather(*(extra(x) for x in trace.sessions))
    finally:
        await client.close()
        await http.aclose()
    m.turns.sort(key=lambda x: (x.session, x.turn))
    m.extra.sort(key=lambda x: (x.session, x.turn))
    return m


def summarize(m: Measured, trace: Trace) -> tuple[dict[str, Any], list[list[Any]]]:
    """(the system's result, its raw per-turn rows)."""
    turns = stats(m.turns, m.wall_s)
    result = {
        "turns": turns,
        "ttft_ms": turns["ttft_ms"],
        "e2e_ms": turns["e2e_ms"],
        "ttft_p50_by_turn_ms": ttft_by_turn(m.turns, trace.turns),
        "extra": stats(m.extra, 1.0),
        "hit_rate": hit_rate(m.before, m.after),
        "sticky": stickiness(m.extra),
        "cpu": m.cpu,
    }
    result["sticky"]["trace_prompt_tokens"] = prompt_tokens_by_replica(m.turns, result["sticky"])
    t0 = min((t.sample.start for t in m.turns), default=0.0)
    rows = [
        [t.session, t.turn, round(t.sample.start - t0, 4), _r(t.sample.ttft), round(t.sample.e2e, 4),
         t.sample.output_tokens, t.sample.prompt_tokens, t.sample.error]
        for t in m.turns
    ]  # fmt: skip
    return result, rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# -- the systems ---------------------------------------------------------------------------------------


def tier_config(model_dir: Path, served: str, max_num_seqs: int, routing: str) -> dict:
    """One tier `bench` of REPLICAS replicas in their own Ray actors (not embedded in the ingress), routed by
    `routing`; CPU shares that fit both replicas and the ingress into a 2-CPU node."""
    doc = servers.tierserve_config(model_dir, served, MAX_MODEL_LEN, max_num_seqs, None, features=False, embed=False)
    tier = doc["tiers"][servers.BENCH_TIER]
    # Two engine cores on the same worker cores would pile onto one core (serving/backends/affinity.py).
    tier["resources"]["colocate_engine_core"] = False
    tier["resources"]["cpus"] = 0.5
    tier["replicas"] = {"min": REPLICAS, "max": REPLICAS, "routing": routing}
    doc["ingress"]["cpus"] = 0.25
    return doc


def litellm_installed() -> bool:
    return Path(servers.bin_of("litellm")).exists()


def start_system(
    name: str, model_dir: Path, args: argparse.Namespace, s: Sizes, workdir: Path, live: list[servers.Server]
) -> tuple[Target, dict[str, Any], list[servers.Server]]:
    """Start `name`'s servers (appended to `live` before they start, so a failed start is stopped too) and wait
    until each generated a token; its target, a description of its config and its servers."""
    here = workdir / name
    if name in TIERSERVE_ROUTING:
        doc = tier_config(model_dir, args.served_name, s.max_num_seqs, TIERSERVE_ROUTING[name])
        server, _note = servers.tierserve_from(lambda _f: doc, args.served_name, here, features=False)
        server.name = name
        started = [server]
        metrics = f"http://{servers.LOOPBACK}:{server.port}/metrics"
        config: dict[str, Any] = {"kind": "tierserve up", "models_yaml": doc}
    else:
        bare = servers.bare_vllm(model_dir, args.served_name, here, MAX_MODEL_LEN, s.max_num_seqs,
                                 name=name if name == "vllm-1" else f"{name}-vllm")  # fmt: skip
        started = [bare]
        metrics = f"http://{servers.LOOPBACK}:{bare.port}/metrics"
        config = {"kind": "bare vLLM", "cmd": " ".join(bare.cmd[1:])}
        if name == "litellm":
            proxy = servers.litellm_proxy(args.served_name, bare.base_url, here)
            started.append(proxy)
            config = {"kind": "LiteLLM proxy in front of a bare vLLM", "vllm_cmd": config["cmd"],
                      "litellm_cmd": " ".join(proxy.cmd[1:])}  # fmt: skip
    for srv in started:
        live.append(srv)
        print(f"starting {srv.name} ...", flush=True)
        srv.start()
    servers.wait_ready(started, args.start_timeout, report_ready)
    front = started[-1]
    replicas = REPLICAS if name in TIERSERVE_ROUTING else 1
    tier = servers.BENCH_TIER if name in TIERSERVE_ROUTING else None
    return Target(name, front.base_url, front.api_key, metrics, tier, replicas), config, started


# -- the document --------------------------------------------------------------------------------------


NOISE = (
    "this machine has few cores, shared by the engines, the gateway, the load generator and other runs; the "
    "systems run one after the other, so compare ratios measured within this run, not absolute times across runs."
)


def document(
    args: argparse.Namespace, s: Sizes, results: dict, raw: dict, configs: dict, startup: dict, notes: list[str],
    started: dt.datetime, host: dict[str, Any], model_dir: Path, longest: int,
) -> dict[str, Any]:
    rat = ratios(results)
    expected = {n: (REPLICAS if n in TIERSERVE_ROUTING else 1) for n in results}
    return {
        "meta": {
            **run_header("agent-trace", args, started, host, model_dir),
            "systems": list(results),
            "workload": {
                "sessions": s.sessions, "turns": s.turns, "concurrency": s.concurrency,
                "tool_tokens": s.tool_tokens, "max_tokens": s.max_tokens, "max_num_seqs": s.max_num_seqs,
                "warmup": s.warmup, "extra_turns": EXTRA_TURNS, "seed": args.seed, "max_model_len": MAX_MODEL_LEN,
                "longest_prompt_tokens_estimate": longest, "prompt_budget": PROMPT_BUDGET,
                "tools": [t["function"]["name"] for t in TOOLS],
            },
            "startup_s": startup,
            "configs": configs,
            "notes": notes,
            "noise": NOISE if (os.cpu_count() or 0) <= 4 else None,
        },
        "results": results,
        "ratios": rat,
        "targets": targets(rat),
        "failures": failures(results, expected),
        "raw": {"fields": ROW_FIELDS, "systems": raw},
    }


def _target_line(t: dict) -> str:
    f = report._f
    op = ">=" if t["kind"] == "min" else "<="
    verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**NOT met**")
    return f"- {t['name']} = {f(t['value'], 3)} (target {op} {t['bound']:g}): {verdict}"


def markdown(doc: dict, png: Path | None = None) -> str:
    """The run's .md: setup, one row per system, the targets, per-replica splits, TTFT by turn, failures."""
    meta, w, f = doc["meta"], doc["meta"]["workload"], report._f
    res = doc["results"]
    lines = [
        f"# Agent-trace benchmark {meta['date']} on {meta['machine']}",
        "",
        f"Run `{meta['command']}`, {meta['started']} → {meta['finished']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["host"].items()) + ".",
        "",
        f"Workload: {w['sessions']} sessions x {w['turns']} turns, {w['concurrency']} sessions at a time, one API "
        f"key; one system prompt and {len(w['tools'])} tools ({', '.join(w['tools'])}, `tool_choice: none`) "
        f"shared by all sessions, a task each; every later turn appends the model's answer and a synthetic tool "
        f"result of {w['tool_tokens']} tokens. Each turn streamed, {w['max_tokens']} output tokens forced "
        f"(`ignore_eos`), sent when the previous one ended; longest prompt about {w['longest_prompt_tokens_estimate']} "
        f"tokens (max_model_len {w['max_model_len']}). No `x-session-id`: tierserve derives the session from the "
        f"key and the conversation's opening. Then {w['extra_turns']} non-streamed 1-token turns per session read "
        f"`x-tierserve-replica`. Seed {w['seed']}; before each trace {w['warmup']} unrelated warm-up requests "
        "(no tools, up to the longest prompt's length).",
        "",
        f"Systems, one after the other: {', '.join(meta['systems'])}. tierserve: one tier `{servers.BENCH_TIER}` of "
        f"{REPLICAS} replicas (0.5 CPU each, not embedded in the ingress, engine.max_num_seqs {w['max_num_seqs']}, "
        "1 GiB KV cache each), routed by `session` (rendezvous hash of the derived session) or `balance` (Ray's "
        "power of two choices). Hit rate = Δ`vllm:prefix_cache_hits_total` / Δ`vllm:prefix_cache_queries_total` "
        "(tokens) over the trace, summed over the engines. Times in ms.",
        "",
        *([f"> **Noise:** {meta['noise']}", ""] if meta.get("noise") else []),
        "| system | turns ok | TTFT p50 | TTFT p95 | TTFT mean | e2e p50 | e2e p95 | output tok/s "
        "| prefix-cache hit rate | sessions on one replica |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(n, r) for n, r in res.items()),
        "",
        *report._section("Targets (reported, not asserted)", [_target_line(t) for t in doc["targets"]]),
        *report._bullets("Context ratios (no target)", [f"{CONTEXT.get(k, k)}: {f(v, 3)}"
                                                        for k, v in doc["ratios"].items() if k in CONTEXT]),
        *report._bullets("Per replica: prompt tokens the engine counted over the trace (share), its hit rate; the "
                         "sessions whose extra turns landed there and their turns' prompt tokens (the same number "
                         "when every turn of those sessions was served there)", _replica_lines(res)),
        *report._bullets("CPU during the trace (core-seconds: the system's engines, its other processes, this load "
                         "generator, anything else on the machine)", _cpu_lines(res)),
        "## TTFT p50 by turn (ms)",
        "",
        "| system | " + " | ".join(f"turn {i + 1}" for i in range(w["turns"])) + " |",
        "|---|" + "---:|" * w["turns"],
        *(f"| {n} | " + " | ".join(f(x) for x in r["ttft_p50_by_turn_ms"]) + " |" for n, r in res.items()),
        "",
        *(report._section("Plot", [f"![TTFT by turn]({png.name})"]) if png else []),
        *report._bullets("Failures", doc["failures"]),
        *report._bullets("Notes", meta.get("notes")),
        *report._bullets("Start-up (until the first token)", [f"{n}: {f(v)} s" for n, v in meta["startup_s"].items()]),
        *report._bullets("Stop problems", meta.get("stop_problems")),
    ]
    return "\n".join(lines)


def _row(name: str, r: dict) -> str:
    f = report._f
    t, st = r["turns"], r["sticky"]
    sticky = "-" if st["sticky"] is None else f"{st['sticky']}/{st['sessions']}"
    return (f"| {name} | {t['ok']}/{t['requests']} | {f(t['ttft_ms']['p50'])} | {f(t['ttft_ms']['p95'])} | "
            f"{f(t['ttft_ms'].get('mean'))} | "
            f"{f(t['e2e_ms']['p50'])} | {f(t['e2e_ms']['p95'])} | {f(t['output_tok_per_s'])} | "
            f"{f(r['hit_rate']['rate'], 3)} | {sticky} |")  # fmt: skip


def _cpu_lines(res: dict) -> list[str]:
    f = report._f
    out = []
    for name, r in res.items():
        c = r.get("cpu")
        if c:
            out.append(f"{name}: machine {f(c['machine_busy_pct'])}% busy over {f(c['window_s'])} s; engines "
                       f"{f(c['engine_s'], 2)}, other processes {f(c['system_other_s'], 2)}, load generator "
                       f"{f(c['load_generator_s'], 2)}, outside {f(c['outside_s'], 2)} ({f(c['outside_cores'], 2)} "
                       "cores)")  # fmt: skip
    return out


def _replica_lines(res: dict) -> list[str]:
    f = report._f
    out = []
    for name, r in res.items():
        per = r["hit_rate"]["per_replica"]
        if len(per) < 2:
            continue
        st = r["sticky"]
        parts = [f"`{rep[:12]}` {f(v['prompt_tokens'], 0)} ({f(v['prompt_share'], 2)}), hit rate {f(v['rate'], 3)}, "
                 f"{st['per_replica'].get(rep, 0)} sessions with {st.get('trace_prompt_tokens', {}).get(rep, 0)} "
                 "prompt tokens" for rep, v in per.items()]  # fmt: skip
        out.append(f"{name}: " + "; ".join(parts))
    return out


def plot(doc: dict, path: Path) -> Path | None:
    """TTFT p50 per turn index, one line per system (matplotlib's Agg backend, as report.plots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    turns = doc["meta"]["workload"]["turns"]
    for name, r in doc["results"].items():
        ys = [y if y is not None else float("nan") for y in r["ttft_p50_by_turn_ms"]]
        axes[0].plot(range(1, turns + 1), ys, marker="o", label=name)
    axes[0].set_xticks(range(1, turns + 1))
    axes[0].set_xlabel("turn")
    axes[0].set_ylabel("TTFT p50 (ms)")
    axes[0].set_title("time to first token by turn")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend()
    names = list(doc["results"])
    rates = [doc["results"][n]["hit_rate"]["rate"] or 0 for n in names]
    axes[1].bar(names, rates)
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("prefix-cache hit rate")
    axes[1].set_title("hit rate over the trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(doc: dict, out_dir: Path) -> list[Path]:
    """<date>-<machine>-agent-trace.json (the per-turn rows one system to a line), .md and .png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{doc['meta']['date']}-{doc['meta']['machine']}-agent-trace"
    png = plot(doc, stem.with_suffix(".png"))
    body = json.dumps({k: v for k, v in doc.items() if k != "raw"}, indent=1, default=str)
    rows = [f"[{json.dumps(n)}, {json.dumps(r, separators=(',', ':'))}]" for n, r in doc["raw"]["systems"].items()]
    raw = (f'{{"fields": {json.dumps(list(doc["raw"]["fields"]))}, "systems_as": ["system", "rows"], '
           f'"systems": [\n' + ",\n".join(rows) + "\n]}")  # fmt: skip
    body = body[: body.rstrip().rfind("}")].rstrip() + ',\n "raw": ' + raw + "\n}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(body + "\n")
    md_path.write_text(markdown(doc, png) + "\n")
    return [json_path, md_path, *([png] if png else [])]


# -- the run -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, help="S, sessions in the trace (default 16; smoke 4)")
    p.add_argument("--turns", type=int, help="T, streamed turns per session (default 5; smoke 3)")
    p.add_argument("--concurrency", type=int, help="C, sessions at a time (default 4; smoke 4)")
    p.add_argument("--tool-tokens", type=int, help="M, tokens of each tool result (default 120; smoke 48)")
    p.add_argument("--max-tokens", type=int, help="output tokens of each turn, forced (default 48; smoke 32)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="each engine's max_num_seqs (default 8)")
    p.add_argument("--warmup", type=int, help="unrelated requests before each system's trace, of the trace's "
                                              "prompt lengths (default 6; smoke 4)")
    p.add_argument("--seed", type=int, default=0, help="the trace's seed: tasks and tool results")
    p.add_argument("--systems", help=f"run in order, of {', '.join(SYSTEMS)} (default all; smoke "
                                     f"{', '.join(SMOKE_SYSTEMS)}); litellm is skipped when not installed")
    p.add_argument("--smoke", action="store_true", help="a small run for CI: 4 sessions x 3 turns, two systems")
    p.add_argument("--model-dir", help="HF-format model directory (default: the tiny model, --tiny-seed)")
    p.add_argument("--tiny-seed", type=int, default=3)
    p.add_argument("--served-name", default=DEFAULT_SERVED)
    p.add_argument("--machine", help="machine label in the file names (default: host name and cores)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--workdir", help="logs, generated configs and key stores (default: a temporary directory)")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--request-timeout", type=float, default=300)
    args = p.parse_args(argv)
    default = SMOKE_SYSTEMS if args.smoke else SYSTEMS
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()] if args.systems else list(default)
    bad = [x for x in args.systems if x not in SYSTEMS]
    if bad or not args.systems or len(set(args.systems)) != len(args.systems):
        p.error(f"--systems: a list of distinct values of {', '.join(SYSTEMS)}")
    return args


def sizes(args: argparse.Namespace) -> Sizes:
    """The load: explicit flags first, then --smoke's small defaults, then the full run's."""

    def pick(given: int | None, smoke: int, full: int) -> int:
        return given if given is not None else (smoke if args.smoke else full)

    s = Sizes(
        sessions=pick(args.sessions, 4, 16),
        turns=pick(args.turns, 3, 5),
        concurrency=pick(args.concurrency, 4, 4),
        tool_tokens=pick(args.tool_tokens, 48, 120),
        max_tokens=pick(args.max_tokens, 32, 48),
        max_num_seqs=args.max_num_seqs,
        warmup=pick(args.warmup, 4, 6),
    )
    if min(s.sessions, s.turns, s.concurrency, s.tool_tokens, s.max_tokens, s.max_num_seqs) <= 0 or s.warmup < 0:
        raise SystemExit("--sessions, --turns, --concurrency, --tool-tokens, --max-tokens, --max-num-seqs: > 0")
    return s


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def run(args: argparse.Namespace) -> int:
    """Each system started, sent the trace and stopped in turn; the files written. Exit 0; 1 when a request
    failed or counters could not be read; 2 when a process did not stop cleanly."""
    started = dt.datetime.now().astimezone()
    host = host_facts()
    s = sizes(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tierserve-agent-trace-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = bench_model_dir(args.model_dir, args.tiny_seed)
    maker = PromptMaker(str(model_dir))
    # PromptMaker encodes twice the words it keeps, and the budget below is checked explicitly: the tokenizer's
    # length warning would only be noise.
    if maker.tok is not None:
        maker.tok.model_max_length = 1 << 30
    trace = build_trace(maker, s, args.seed)
    longest = longest_prompt(trace, TokenCounter(maker.tok), placeholder_answer(maker, s.max_tokens))
    if longest > PROMPT_BUDGET:
        raise SystemExit(f"the last turn's prompt would be about {longest} tokens, over the {PROMPT_BUDGET}-token "
                         "budget: fewer --turns or --tool-tokens")  # fmt: skip
    # Lengths spread from a short prompt to the longest (tierserve: the requests spread over both replicas).
    warm = [maker.make(max(16, longest * (i + 1) // s.warmup - 64), 1, seed=1000 + i)[0] for i in range(s.warmup)]
    notes: list[str] = []
    systems = list(args.systems)
    if "litellm" in systems and not litellm_installed():
        systems.remove("litellm")
        notes.append("litellm skipped: not installed in this environment")
    print(f"workdir {workdir} (logs, generated configs, key stores); longest prompt about {longest} tokens", flush=True)
    engines_before = servers.engine_pids()
    results: dict[str, dict] = {}
    raw: dict[str, list] = {}
    configs: dict[str, dict] = {}
    startup: dict[str, float] = {}
    stop_problems: list[str] = []
    live: list[servers.Server] = []
    try:
        for name in systems:
            target, configs[name], mine = start_system(name, model_dir, args, s, workdir, live)
            startup[name] = round(max(x.ready_s or 0.0 for x in mine), 1)
            measured = asyncio.run(measure(target, trace, s, args.served_name, args.request_timeout, warm,
                                           CpuWindow(mine)))
            for x in mine:
                x.snapshot()
            check_alive(mine)
            results[name], raw[name] = summarize(measured, trace)
            print(system_line(name, results[name]), flush=True)
            stop_problems += stop_all(mine, engines_before)
            for x in mine:
                live.remove(x)
    finally:
        stop_problems += stop_all(live, engines_before)
    doc = document(args, s, results, raw, configs, startup, notes, started, host, model_dir, longest)
    doc["meta"]["stop_problems"] = stop_problems
    for path in write(doc, Path(args.out_dir)):
        print(f"wrote {path}")
    for t in doc["targets"]:
        print(_target_line(t)[2:])
    for line in doc["failures"]:
        print(f"FAILED: {line}")
    if doc["failures"]:
        return 1
    return 0 if not stop_problems else 2


def system_line(name: str, r: dict) -> str:
    f = report._f
    t, st = r["turns"], r["sticky"]
    return (f"{name}: {t['ok']}/{t['requests']} turns ok; TTFT p50 {f(t['ttft_ms']['p50'])} p95 "
            f"{f(t['ttft_ms']['p95'])} ms; {f(t['output_tok_per_s'])} tok/s; hit rate {f(r['hit_rate']['rate'], 3)}"
            + ("" if st["sticky"] is None else f"; {st['sticky']}/{st['sessions']} sessions on one replica"))


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
