"""Shared fixtures: the real appliance (Ray Serve + three vLLM CPU engines on tiny models), started once.

It is started the way a user starts it, `tierserve up`, on a free loopback port, and stopped with SIGINT;
the teardown fails the run if any engine process outlives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest
import yaml

from serving.backends.affinity import engine_cores
from serving.cli import unclaimed_port
from serving.config import deep_merge

if TYPE_CHECKING:
    from tests.support.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("coder", "reasoning", "fast", "embed")  # the tiers that must be up before tests start
# The session app: the local profile plus what the autoscaling tests need, with short delays:
# `fast` scales 1..2, and `spare` starts at zero replicas (a 5th engine, only while it is warm).
# Ray counts 2 logical CPUs here: tiers at 0.25 each leave room for the extra `fast` and `spare` replicas
# (5 x 0.25 + 0.25 more for fast + 0.25 ingress = 1.75), so scaling is never stuck waiting for resources.
TEST_OVERLAY = {
    # Keys on, as in production; the key file is re-read on every request so revocations show at once.
    "auth": {"enabled": True, "reload_interval_s": 0},
    # A stalled upload is cut after 10 s (the fuzz test's slow clients). Not less: under the scale-up test's load
    # on 2 cores, a small body once took over 3 s to reach the ingress through the Serve proxy.
    "limits": {"body_timeout_s": 10},
    # `reasoning` runs in the ingress replica (no Ray hop); the other tiers are deployments of their own, so
    # every test that spans the tiers covers both request paths.
    "ingress": {"embed_tier": "reasoning"},
    "tiers": {
        # Its engine core on its worker's cores (serving/backends/affinity.py); the others keep vLLM's placement.
        # No tool-call parser: tool_choice "auto" there is a clear 400 naming the setting.
        # Its deterministic answers may be replayed from the response cache, for keys that opt in too.
        "coder": {"resources": {"cpus": 0.25, "colocate_engine_core": True}, "tool_call_parser": None,
                  "response_cache": True},
        # A price per hour, so a key's budget can run out on a local tier: $1 per request-millisecond.
        "reasoning": {"resources": {"cpus": 0.25}, "cost_per_hour_usd": 3_600_000,
                      "replicas": {"keep_warm_hours": "00:00-00:00", "keep_warm_interval_s": 2}},
        "embed": {"resources": {"cpus": 0.25}},
        # Left free here (the local profile colocates it): it scales to a second replica under load, and a
        # replica starting beside a colocated, loaded one on the same core did not come up in time.
        "fast": {"resources": {"cpus": 0.25, "colocate_engine_core": False},
                 "replicas": {"min": 1, "max": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                              "downscale_delay_s": 15}},
        # A reasoning parser: its answers' thinking comes back apart (tests/e2e/test_agent_protocols.py).
        "spare": {"served_name": "tiny-spare", "aliases": ["cold"], "model": {"tiny_seed": 4},
                  "reasoning_parser": "deepseek_r1",
                  "engine": {"max_model_len": 512, "dtype": "float32", "enforce_eager": True, "max_num_seqs": 32},
                  # A batch key's requests: two at a time, the next wait in the gateway (tests/e2e/test_priority.py).
                  "slots": {"batch_per_replica": 2},
                  "resources": {"gpus": 0, "cpus": 0.25, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
                  "replicas": {"min": 0, "max": 1, "initial": 0, "target_ongoing_requests": 1,
                               "upscale_delay_s": 0, "downscale_delay_s": 20},
                  # Its tests wait for the cold start itself (their answers must come from this engine, not a
                  # provider); on a loaded 2-core machine that start took over the default 120 s.
                  "overflow": {"max_cold_wait_s": 280}},
    }
}


UPSTREAM_MODEL = "up"  # what the bare vLLM upstream calls its model
BARE_TOOL_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tool-strict-level", "parameter")


def provider_overlay(peer_url: str, metered_url: str, paid_url: str) -> dict:
    """Fallback providers, all real OpenAI-compatible servers on loopback behind fault proxies.
    `reasoning` has no provider, so an engine failure there is seen by the client as a 5xx."""
    served = {"coder": UPSTREAM_MODEL, "fast": UPSTREAM_MODEL, "spare": UPSTREAM_MODEL}
    quick = {"timeout_connect_s": 5, "timeout_read_s": 20, "timeout_total_s": 30}
    return {
        "providers": [
            # Speaks every endpoint but Anthropic's Messages, so that a Messages request no provider speaks is
            # seen too; `metered` speaks only chat and completions.
            {"name": "peer", "kind": "vllm", "base_url": f"{peer_url}/v1", "models": served,
             "endpoints": ["chat", "completion", "responses", "count_tokens"],
             "max_context": 1024, "priority": 10, "retries": 1, **quick},
            {"name": "metered", "kind": "vllm", "base_url": f"{metered_url}/v1", "models": served,
             "endpoints": ["chat", "completion"],
             "max_context": 1024, "priority": 20, "retries": 0, "price_input_per_1m_usd": 1000,
             "price_output_per_1m_usd": 1000, "budget_daily_usd": 0.05, **quick},
            {"name": "paidapi", "kind": "openai", "base_url": f"{paid_url}/v1",
             "api_key_env": "TIERSERVE_TEST_PAID_KEY", "models": served, "max_context": 100000, "priority": 1,
             "paid": True, **quick},
        ],
        "routing": {"breaker": {"failures": 3, "cooldown_s": 8}},
        "tiers": {"coder": {"overflow": {"max_queue_per_replica": 4}}},
    }


def write_test_config(directory: Path, providers: dict | None = None) -> Path:
    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    data["profiles"]["test"] = deep_merge(deep_merge(data["profiles"]["local"], TEST_OVERLAY), providers or {})
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Upstream:
    """Bare vLLM's own OpenAI server on the tiny model: the fallback providers' real upstream."""

    def __init__(self, log_path: Path) -> None:
        # Imported here: the benchmark's modules pull in the OpenAI client, which most tests don't need.
        from benchmarks.servers import vllm_server
        from serving.backends.tinymodel import cached_tiny_model

        model = cached_tiny_model(Path.home() / ".cache" / "tierserve", 3)
        # The test's own environment, unlike the benchmark's child_env().
        # Tool calling as the tiers serve it: the reference for the differential tests of the agent protocols.
        server = vllm_server("upstream", model, UPSTREAM_MODEL, log_path, 2048, *BARE_TOOL_FLAGS,
                             env=dict(os.environ))
        server.start()
        assert server.proc is not None
        self.proc: subprocess.Popen = server.proc
        self.port = server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bare vLLM exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError("bare vLLM upstream did not start")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    assert not engine_processes(), "engine or Ray processes already running; stop them before the tests"
    server = Upstream(tmp_path_factory.mktemp("upstream") / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxies(upstream: Upstream) -> Iterator[dict[str, FaultProxy]]:
    from tests.support.faultproxy import FaultProxy

    started = {name: FaultProxy(("127.0.0.1", upstream.port)).start() for name in ("peer", "metered", "paidapi")}
    yield started
    for proxy in started.values():
        proxy.stop()


@pytest.fixture(scope="session")
def app_config_path(tmp_path_factory: pytest.TempPathFactory, proxies: dict) -> Path:
    overlay = provider_overlay(proxies["peer"].url, proxies["metered"].url, proxies["paidapi"].url)
    return write_test_config(tmp_path_factory.mktemp("config"), overlay)
START_TIMEOUT_S = 420
ENGINE_MARKERS = ("VLLM::", "EngineCore", "ServeReplica:tierserve", "ray::", "raylet", "gcs_server")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.support.measure import MEASUREMENTS, slowest

    if MEASUREMENTS:
        terminalreporter.section("tierserve measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
    # Last before pytest's short summary, so that a CI log's tail shows where the run's time went.
    reports = [r for kind in ("passed", "failed", "error") for r in terminalreporter.stats.get(kind, [])]
    lines = slowest([(r.nodeid, r.duration) for r in reports if hasattr(r, "duration")])
    if lines:
        terminalreporter.section("where the time went")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that break a tier on purpose run last, so the others see a healthy app."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disruptive: kills parts of the shared app; runs after the rest")
    # Ordered first by tests/benchmarks/conftest.py, wherever the test lives.
    config.addinivalue_line("markers", "bench: starts its own servers; runs first, before the shared app starts")


def free_port() -> int:
    return unclaimed_port("127.0.0.1")  # the app binds it only once its engines are up


def engine_processes(exclude_session: int | None = None) -> list[psutil.Process]:
    """Engine and Ray processes, except those of one process session (the bare vLLM upstream's)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        if exclude_session is not None:
            with contextlib.suppress(OSError):
                if os.getsid(proc.pid) == exclude_session:
                    continue
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; only unreaped because PID 1 in this sandbox doesn't reap
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(marker in text for marker in ENGINE_MARKERS):
            found.append(proc)
    return found


def replica_process(deployment: str) -> psutil.Process:
    """A deployment's replica: `tier-<name>` or `ingress`."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:tierserve:{deployment}" in part for part in proc.info["cmdline"] or []):
            return proc
    raise LookupError(f"no replica process for {deployment}")


def engine_core_under(deployment: str) -> psutil.Process:
    """The replica's vLLM engine core, found by shape (serving/backends/affinity.py's engine_cores)."""
    cores = engine_cores(replica_process(deployment))
    if not cores:
        raise LookupError(f"no engine core process under the {deployment} replica")
    return next(iter(cores))


def engine_core_placement(deployment: str) -> tuple[set[int], list[set[int]]]:
    """(the CPUs the replica's engine-core workers are bound to, each engine-core thread's CPUs)."""
    core = engine_core_under(deployment)
    workers = core.children()
    assert workers, f"no worker process under the {deployment} engine core"
    bound = set().union(*(set(w.cpu_affinity()) for w in workers))
    return bound, [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{core.pid}/task")]


def engine_core_follows_its_worker(deployment: str) -> set[int]:
    """Asserts every engine-core thread may run exactly where its workers are bound; returns those CPUs."""
    bound, threads = engine_core_placement(deployment)
    assert threads and all(t == bound for t in threads), (deployment, bound, threads)
    return bound


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def tierserve_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("tierserve")), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def create_key(env: dict[str, str], config: Path, *options: str) -> str:
    """`tierserve keys create ...` as an operator runs it; returns the plaintext key it printed once."""
    out = tierserve_cli("keys", "--config", str(config), "--profile", "test", "create", *options, env=env)
    assert out.returncode == 0, out.stderr
    keys = [word for word in out.stdout.split() if word.startswith("ts_")]
    assert len(keys) == 1, out.stdout
    return keys[0]


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float, key: str) -> float:
    """Ready = every tier has generated a token (or an embedding) through the ingress (not merely: the process
    is up)."""
    start = time.monotonic()
    pending = set(TIERS)
    with httpx.Client(base_url=base, timeout=30, headers=auth(key)) as client:
        while pending:
            if proc.poll() is not None:
                raise RuntimeError(f"tierserve up exited with {proc.returncode} before it was ready")
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"tiers not ready after {timeout_s}s: {sorted(pending)}")
            for tier in sorted(pending):
                try:
                    if tier == "embed":  # an embedding tier: one embedding is its proof
                        r = client.post("/v1/embeddings", json={"model": tier, "input": "hi"})
                    else:
                        r = client.post("/v1/completions", json={"model": tier, "prompt": "hi", "max_tokens": 1})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and r.headers.get("x-tierserve-provider") == "local":
                    pending.discard(tier)  # served by the tier itself, not by a fallback provider
                elif "failed to deploy" in r.text:
                    raise RuntimeError(f"the app failed to deploy: {r.text[:300]}")
            time.sleep(2)
    return time.monotonic() - start


class OtlpReceiver:
    """A real OTLP/HTTP endpoint on loopback that keeps every export request body it receives."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        out = []
        for path, body in list(self.bodies):
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        out.extend(ss.spans)
        return out


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


@dataclass(frozen=True)
class App:
    url: str
    key: str  # an unrestricted agent key, created with `tierserve keys create` before the start
    admin_key: str  # its sha256 is in TIERSERVE_ADMIN_KEY_SHA256
    env: dict[str, str]  # the app's environment: `tierserve keys` with it edits the live key store
    config: Path
    state_dir: Path
    log_path: Path


@pytest.fixture(scope="session")
def app(
    tmp_path_factory: pytest.TempPathFactory, app_config_path: Path, otlp: OtlpReceiver, upstream: Upstream
) -> Iterator[App]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "tierserve-up.log"
    state_dir = tmp_path_factory.mktemp("state")
    admin_key = "admin-" + secrets.token_urlsafe(32)
    # Tracing on, exported to the test's receiver quickly (the exporter's default batch delay is 5 s).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
           "OTEL_BSP_SCHEDULE_DELAY": "200", "TIERSERVE_STATE_DIR": str(state_dir),
           "TIERSERVE_ADMIN_KEY_SHA256": hashlib.sha256(admin_key.encode()).hexdigest()}
    env.pop("RAY_ADDRESS", None)
    env.pop("TIERSERVE_KEYS_FILE", None)
    key = create_key(env, app_config_path, "--agent", "e2e")
    cmd = [str(Path(sys.executable).with_name("tierserve")), "up", "--port", str(port),
           "--config", str(app_config_path), "--profile", "test"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        took = wait_ready(base, proc, START_TIMEOUT_S, key)
        upstream.wait(START_TIMEOUT_S)
        print(f"\n[tierserve] app ready in {took:.1f}s on {base}")
        _report_memory()
        yield App(base, key, admin_key, env, app_config_path, state_dir, log_path)
    except BaseException:
        print(log_path.read_text()[-6000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        leftovers = _wait_gone(60, upstream.proc.pid)
        for p in leftovers:
            p.kill()
        assert not leftovers, f"processes outlived `tierserve up`: {[p.info['cmdline'][:2] for p in leftovers]}"
    assert proc.returncode == 0, f"tierserve up exited with {proc.returncode}"


@pytest.fixture(scope="session")
def app_url(app: App) -> str:
    return app.url


@pytest.fixture(scope="session")
def api_key(app: App) -> str:
    return app.key


def _wait_gone(timeout_s: float, exclude_session: int) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := engine_processes(exclude_session)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def _report_memory() -> None:
    rss = {}
    for proc in engine_processes():
        try:
            rss[" ".join(proc.info["cmdline"] or [])[:60]] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    print(f"[tierserve] engine/Ray processes: {len(rss)}, resident {sum(rss.values()) / 2**30:.2f} GiB")
