"""The benchmark's idle-CPU reading (benchmarks.servers.idle_cpu) on real process trees."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.report import markdown
from benchmarks.servers import Server, child_env, idle_cpu

# A parent that starts a spinning child titled like vLLM's engine process, then sleeps.
TREE = (
    "import subprocess, sys, time\n"
    "spin = 'import time\\nend = time.time() + 4\\nwhile time.time() < end: pass\\n'\n"
    "subprocess.Popen([sys.executable, '-c', spin, 'VLLM::EngineCore'])\n"
    "time.sleep(4)\n"
)


def _server(name: str, code: str, tmp_path: Path) -> Server:
    return Server(name, [sys.executable, "-c", code], 0, "m", tmp_path / f"{name}.log", child_env())


def test_idle_cpu_splits_each_servers_tree_into_gateway_and_engine(tmp_path: Path) -> None:
    engine_only = _server("engine-only", TREE, tmp_path)
    quiet = _server("quiet", "import time; time.sleep(4)", tmp_path)
    started = [engine_only, quiet]
    for s in started:
        s.start()
    try:
        time.sleep(0.5)  # the child is up
        idle = idle_cpu(started, 2.0)
    finally:
        for s in started:
            s.stop(grace_s=5)
    assert idle["engine-only"]["engine_pct_core"] > 40  # the spinning child, counted as the engine
    assert idle["engine-only"]["gateway_pct_core"] < 10  # its sleeping parent
    assert idle["quiet"]["engine_pct_core"] == 0.0
    assert idle["quiet"]["gateway_pct_core"] < 10


def test_idle_cpu_of_a_server_that_never_started_is_zero(tmp_path: Path) -> None:
    never = _server("never", "pass", tmp_path)
    assert idle_cpu([never], 0.01) == {"never": {"gateway_pct_core": 0.0, "engine_pct_core": 0.0}}


def test_report_shows_the_idle_table() -> None:
    doc = {
        "meta": {"date": "d", "machine": "m", "command": "c", "sweep": "s", "started": "a", "finished": "b",
                 "host": {}, "systems": {}, "workload": {"prompt_tokens": 1, "output_tokens": 1,
                                                         "requests_rule": "r", "warmup": 0}},
        "results": {}, "ratios": {}, "targets": {}, "probes": {},
        "cost": {"gpu_hourly_usd": 1.0, "price_source": "x", "hosted": {}, "per_mode": {}},
        "idle_cpu": {"seconds": 20.0, "systems": {"bare": {"gateway_pct_core": 0.4, "engine_pct_core": 1.1},
                                                  "tierserve": {"gateway_pct_core": 9.25, "engine_pct_core": 1.2}}},
    }
    md = markdown(doc, [])
    assert "## Idle CPU (20 s after the loads" in md
    assert "| bare | 0.40 | 1.10 |" in md
    assert "| tierserve | 9.25 | 1.20 |" in md
