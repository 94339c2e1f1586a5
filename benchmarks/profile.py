"""`--profile NAME`: the three systems on one tier of a models.yaml profile, with that tier's real engine settings.

The tier is read with serving.config.load_config, its weights resolved once (serving/backends/weights.py) and
every system serves that one directory under the tier's served name:

- bare vLLM: `python -m vllm.entrypoints.openai.api_server` with the tier's engine arguments as flags (dtype,
  quantization, max_model_len, gpu_memory_utilization, tensor_parallel_size, max_num_seqs, enforce_eager,
  seed, then `engine.extra`) in the tier's `resources.env`;
- tierserve: `tierserve up` on a one-tier config whose tier `bench` is the profile's tier (engine, resources,
  env, price) with its model pointed at that directory;
- LiteLLM in front of the bare vLLM, as without a profile.

Everything here builds plans (command lines, environments, configs) and starts nothing, so a GPU profile's
plan can be checked on a CPU machine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import servers
from serving.config import AppConfig, EngineArgs, Tier, load_config

# The share of a GPU two engines may take between them when neither knows the GPU's size: vLLM's CUDA
# context (about 0.5 GiB per engine) sits outside each engine's gpu_memory_utilization share.
UNKNOWN_GPU_HEADROOM = 0.95


@dataclass(frozen=True)
class ProfileTier:
    """One tier of one profile, as load_config resolved it."""

    config_path: Path
    profile: str
    name: str
    config: AppConfig

    @property
    def tier(self) -> Tier:
        return self.config.tiers[self.name]

    @property
    def on_gpu(self) -> bool:
        return self.tier.resources.gpus > 0

    @property
    def embedded(self) -> bool:
        """Whether the profile runs this tier inside the ingress replica."""
        return self.config.ingress.embed_tier == self.name


def select(config_path: str | Path, profile: str, tier: str | None = None) -> ProfileTier:
    """The profile's tier `tier`, default its routing.default_tier (the first tier when that is not one, as the
    router does). Raises SystemExit with the known names when either is unknown."""
    from serving.config import ConfigError

    try:
        config = load_config(config_path, profile)
    except ConfigError as exc:
        raise SystemExit(f"--profile {profile}: {exc}") from None
    name = tier or config.routing.default_tier
    if tier is None and name not in config.tiers:
        name = next(iter(config.tiers))
    if name not in config.tiers:
        raise SystemExit(f"--tier {name}: profile {profile} has no such tier (it has {', '.join(config.tiers)})")
    return ProfileTier(Path(config_path), profile, name, config)


def resolve_model(pt: ProfileTier, cache_dir: Path) -> Path:
    """The tier's weights as a local directory: generated, checked, or downloaded (the whole snapshot)."""
    from serving.backends.weights import WeightsError, resolve

    try:
        return Path(resolve(pt.tier.model, cache_dir)).resolve()
    except WeightsError as exc:
        raise SystemExit(f"tier {pt.name}: {exc}") from None


def flag_values(name: str, value: Any) -> list[str]:
    """One engine argument as vLLM's CLI takes it: booleans as --x / --no-x, dicts as JSON, lists as values."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, json.dumps(value, separators=(",", ":"))]
    if isinstance(value, list | tuple):
        return [flag, *(str(v) for v in value)]
    return [flag, str(value)]


def engine_flags(engine: EngineArgs) -> list[str]:
    """The vLLM server flags of a tier's engine: the fields serving/backends/tier.py passes to AsyncEngineArgs,
    then `extra`, in that order."""
    fields = {
        "dtype": engine.dtype,
        "quantization": engine.quantization,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "seed": engine.seed,
    }
    out = [part for k, v in fields.items() for part in flag_values(k, v)]
    if engine.enforce_eager:
        out.append("--enforce-eager")
    return out + [part for k, v in engine.extra.items() for part in flag_values(k, v)]


def bare_vllm(pt: ProfileTier, model_dir: Path, served: str, workdir: Path, name: str = "bare") -> servers.Server:
    """vLLM's own server on the tier's engine settings and environment, on a free loopback port; not started."""
    port = servers.free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served,
        "--host", servers.LOOPBACK, "--port", str(port),
        *engine_flags(pt.tier.engine), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = servers.child_env(**pt.tier.resources.env)
    return servers.Server(name, cmd, port, served, workdir / f"{name}-vllm.log", env)


def tier_entry(tier: Tier, model_dir: Path, served: str) -> dict[str, Any]:
    """The profile's tier as tier `bench` of the generated config: one fixed replica on this node, the resolved
    weights directory, and no overflow policy."""
    doc = tier.model_dump(mode="json")
    doc["served_name"] = served
    doc["model"] = {"path": str(model_dir)}
    # One replica against one bare vLLM. Custom resources pin tiers to cluster nodes; this node has none.
    doc["replicas"] = {"min": 1, "max": 1}
    doc["resources"]["custom"] = {}
    # Overflow would send requests past a limit elsewhere (or refuse them): every request is the tier's here.
    doc["overflow"] = {}
    return doc


def tierserve_config(
    pt: ProfileTier, model_dir: Path, served: str, bare_url: str | None, features: bool, embed: bool
) -> dict[str, Any]:
    """A models.yaml (profile `bench`) whose tier `bench` is the profile's tier; with `features` and a bare URL
    also `auto` routing, the bare vLLM as fallback provider and the always-cold `bench-fallback` tier, as
    servers.tierserve_config does for the tiny model."""
    bench = tier_entry(pt.tier, model_dir, served)
    tiers: dict[str, Any] = {servers.BENCH_TIER: bench}
    ingress = pt.config.ingress.model_dump(mode="json", include={"cpus", "max_ongoing_requests"})
    doc: dict[str, Any] = {"version": 1, "ingress": ingress, "tiers": tiers}
    if embed:
        doc["ingress"]["embed_tier"] = servers.BENCH_TIER
    if features and bare_url:
        cold = json.loads(json.dumps(bench))
        cold.update(served_name=f"{served}-fallback", aliases=[], replicas={"min": 0, "max": 1, "initial": 0},
                    overflow={"cold_start": "fallback", "on_unavailable": "fallback"})
        # A Ray resource no node has: the replica never schedules, so it never takes GPU memory either.
        cold["resources"]["custom"] = {"tierserve_bench_unschedulable": 1}
        tiers[servers.FALLBACK_TIER] = cold
        doc["providers"] = [{
            "name": servers.PROVIDER, "kind": "vllm", "base_url": bare_url, "default_model": served,
            "max_context": pt.tier.engine.max_model_len, "timeout_total_s": 120, "timeout_read_s": 120,
        }]  # fmt: skip
        doc["routing"] = {"default_tier": servers.BENCH_TIER}
    doc["profiles"] = {"bench": {}}
    return doc


def tierserve(
    pt: ProfileTier, model_dir: Path, served: str, workdir: Path, bare_url: str | None, features: bool, embed: bool
) -> tuple[servers.Server, dict]:
    """`tierserve up` on the generated config, not started; and the note on its features."""
    server, note = servers.tierserve_from(
        lambda with_features: tierserve_config(pt, model_dir, served, bare_url, with_features, embed),
        served, workdir, features,
    )  # fmt: skip
    if features and not bare_url:
        note["features_configured"] = False
        note["features_reason"] = "no bare vLLM runs beside tierserve to be its fallback provider"
    note["embedded"] = embed
    return server, note


def tierserve_shipped(pt: ProfileTier, workdir: Path, cache_dir: str | None) -> servers.Server:
    """`tierserve up --config CONFIG --profile P` as a user runs it: every tier of the profile where the profile
    puts it, the user's model cache; only the port (a free one on loopback) and the state directory (keys, spend:
    the run's own, not the user's) differ. When the profile has auth on, the load generator gets an agent key."""
    env = servers.child_env(TIERSERVE_STATE_DIR=str(workdir / "shipped-state"))
    env.pop("TIERSERVE_KEYS_FILE", None)
    port = servers.free_port()
    cmd = [servers.bin_of("tierserve"), "up", "--config", str(pt.config_path), "--profile", pt.profile,
           "--host", servers.LOOPBACK, "--port", str(port)] + (["--cache-dir", cache_dir] if cache_dir else [])
    setup = (lambda s: servers.create_agent_key(s, pt.config_path, pt.profile)) if pt.config.auth.enabled else None
    return servers.Server("tierserve-shipped", cmd, port, pt.tier.served_name, workdir / "tierserve-shipped.log",
                          env, setup=setup)  # fmt: skip


def engines_fit_together(engine: EngineArgs, engines: int, gpu_memory_bytes: int | None) -> bool:
    """Whether `engines` copies of this GPU engine fit one set of GPUs at once: their gpu_memory_utilization
    shares plus each one's CUDA context (serving/ops/fit.py's allowance) per GPU. Without the GPU's size, a
    fixed headroom stands in for the contexts."""
    share = engine.gpu_memory_utilization
    if gpu_memory_bytes is None:
        return engines * share <= UNKNOWN_GPU_HEADROOM
    try:
        from serving.ops.fit import outside_bytes

        outside = outside_bytes(engine)
    except ImportError:
        outside = 1 << 29
    return engines * (share * gpu_memory_bytes + outside) <= gpu_memory_bytes


def gpu_memory(nvml: Any = None) -> tuple[int | None, str]:
    """The smallest GPU's memory on this machine as NVML reads it (serving/ops/gpu.py), or None and why not."""
    import logging

    from serving.ops.gpu import GpuCollector

    # The collector warns that the server's GPU telemetry is off; here the caller reports it.
    gpu_log = logging.getLogger("serving.ops.gpu")
    level = gpu_log.level
    gpu_log.setLevel(logging.ERROR)
    collector = GpuCollector(nvml)
    try:
        snap = collector.snapshot()
    finally:
        collector.close()
        gpu_log.setLevel(level)
    sizes = [g.memory_total_bytes for g in snap.gpus if g.memory_total_bytes]
    if not snap.available or not sizes:
        return None, str(snap.error or "no GPU memory readings")
    return min(sizes), f"{len(sizes)} GPU(s)"


def engines_wanted(wanted: list[str]) -> int:
    """vLLM engines the systems need: bare (LiteLLM shares it), bare-colocated, tierserve's tier."""
    return int("bare" in wanted or "litellm" in wanted) + int("bare-colocated" in wanted) + int("tierserve" in wanted)


def schedule(pt: ProfileTier, wanted: list[str], asked: str, memory: int | None) -> tuple[str, str]:
    """`together` (every engine resident at once, levels interleave the systems) or `apart` (bare + LiteLLM
    measured, stopped, then tierserve), and why. `auto` keeps a GPU tier's engines together only where two
    of them fit its GPUs at the tier's own gpu_memory_utilization."""
    if asked != "auto":
        return asked, f"--schedule {asked}"
    if not pt.on_gpu:
        return "together", "a CPU tier: the engines share RAM, not a GPU"
    n = engines_wanted(wanted)
    if n <= 1:
        return "together", "one engine"
    e = pt.tier.engine
    size = f"{memory / 2**30:.0f} GiB GPUs" if memory else "GPUs of unknown size"
    if engines_fit_together(e, n, memory):
        return "together", f"{n} engines x gpu_memory_utilization {e.gpu_memory_utilization:g} fit the {size}"
    return "apart", (f"{n} engines x gpu_memory_utilization {e.gpu_memory_utilization:g} do not fit the {size} "
                     "at once: one engine at a time")


def system_text(pt: ProfileTier, embed: bool, base: dict[str, str]) -> dict[str, str]:
    """The report's sentence per system in profile mode: `base`'s, with bare vLLM's and tierserve's replaced."""
    t = pt.tier
    flags = " ".join(engine_flags(t.engine))
    where = ("embedded in the ingress replica (HTTP → ingress replica → engine core)" if embed else
             "in its own deployment (HTTP → ingress replica → tier replica → engine core)")
    return {
        **base,
        "bare": f"vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) with tier "
        f"`{pt.name}`'s engine settings (`{flags}`)" + (f" and env {dict(t.resources.env)}" if t.resources.env else ""),
        "tierserve": f"`tierserve up` on a one-tier config: tier `bench` = profile `{pt.profile}`'s tier `{pt.name}` "
        f"(its engine, resources.gpus {t.resources.gpus:g} and env; one replica), {where}",
    }


def meta(pt: ProfileTier, model_dir: Path, schedule_: tuple[str, str], embed: bool) -> dict[str, Any]:
    """What the report records about the profile's tier."""
    t = pt.tier
    return {
        "config": str(pt.config_path),
        "profile": pt.profile,
        "tier": pt.name,
        "model": t.model.model_dump(exclude_none=True),
        "model_dir": str(model_dir),
        "served_name": t.served_name,
        "engine": t.engine.model_dump(mode="json"),
        "resources": {"gpus": t.resources.gpus, "cpus": t.resources.cpus, "env": dict(t.resources.env)},
        "embedded": embed,
        "schedule": schedule_[0],
        "schedule_reason": schedule_[1],
    }
