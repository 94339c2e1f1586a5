"""Shared fixtures: the real appliance (Ray Serve + three vLLM CPU engines on tiny models), started once.

It is started the way a user starts it, `tierserve up`, on a free loopback port, and stopped with SIGINT;
the teardown fails the run if any engine process outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("coder", "reasoning", "fast")
START_TIMEOUT_S = 420
ENGINE_MARKERS = ("VLLM::", "EngineCore", "ServeReplica:tierserve", "ray::", "raylet", "gcs_server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that break a tier on purpose run last, so the others see a healthy app."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disruptive: kills parts of the shared app; runs after the rest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(marker in text for marker in ENGINE_MARKERS):
            found.append(proc)
    return found


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Ready = every tier has generated a token through the ingress (not merely: the process is up)."""
    start = time.monotonic()
    pending = set(TIERS)
    with httpx.Client(base_url=base, timeout=30) as client:
        while pending:
            if proc.poll() is not None:
                raise RuntimeError(f"tierserve up exited with {proc.returncode} before it was ready")
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"tiers not ready after {timeout_s}s: {sorted(pending)}")
            for tier in sorted(pending):
                try:
                    r = client.post("/v1/completions", json={"model": tier, "prompt": "hi", "max_tokens": 1})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    pending.discard(tier)
            time.sleep(2)
    return time.monotonic() - start


@pytest.fixture(scope="session")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert not engine_processes(), "engine or Ray processes already running; stop them before the tests"
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "tierserve-up.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).with_name("tierserve")), "up", "--port", str(port), "--profile", "local"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        took = wait_ready(base, proc, START_TIMEOUT_S)
        print(f"\n[tierserve] app ready in {took:.1f}s on {base}")
        _report_memory()
        yield base
    except BaseException:
        print(log_path.read_text()[-6000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        leftovers = _wait_gone(60)
        for p in leftovers:
            p.kill()
        assert not leftovers, f"processes outlived `tierserve up`: {[p.info['cmdline'][:2] for p in leftovers]}"
    assert proc.returncode == 0, f"tierserve up exited with {proc.returncode}"


def _wait_gone(timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := engine_processes()) and time.monotonic() < deadline:
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
