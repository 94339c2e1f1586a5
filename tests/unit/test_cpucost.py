"""benchmarks.cpucost: CPU per process group, read from the real processes (psutil)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpucost import cpu_by_process, idle, spent_by_group

BUSY = "import time\nend = time.time() + 4\nwhile time.time() < end: pass\n"


def test_spent_by_group_counts_a_new_process_from_zero() -> None:
    before = {1: ("engine core", 10.0), 2: ("ray system", 3.0)}
    after = {1: ("engine core", 10.5), 2: ("ray system", 3.25), 3: ("ray system", 0.5)}
    assert spent_by_group(before, after) == {"engine core": 0.5, "ray system": 0.75}


def test_idle_reports_a_busy_process_in_its_group_and_nothing_for_quiet_ones() -> None:
    # The command line names the group ("EngineCore"), as vLLM's engine process's title does.
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "EngineCore"])
    quiet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)", "gcs_server"])
    try:
        before = cpu_by_process()
        result = asyncio.run(idle(1.5))
        after = cpu_by_process()
    finally:
        busy.kill()
        quiet.kill()
        busy.wait()
        quiet.wait()
    assert result["idle_s"] == 1.5
    # A spinning loop: most of a core even on a loaded 2-core box.
    assert result["cpu_percent_of_core"]["engine core"] > 40
    # Per process, because the groups also hold whatever Ray or vLLM runs on the machine (the e2e app).
    assert before[busy.pid][0] == "engine core" and before[quiet.pid][0] == "ray system"
    assert after[busy.pid][1] - before[busy.pid][1] > 0.6
    assert after[quiet.pid][1] - before[quiet.pid][1] < 0.15


def test_cli_idle_prints_one_json_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpucost", "http://127.0.0.1:9/v1", "m", "quiet", "--idle", "0.2"],
        capture_output=True, text=True, check=True,
    )
    line = json.loads(out.stdout)
    assert line["label"] == "quiet" and line["idle_s"] == 0.2
    assert isinstance(line["cpu_percent_of_core"], dict)


# A server that forks an engine core, which forks a worker; the forks keep the server's command line, as
# vLLM's engine processes do inside a Ray replica when its setproctitle did not take.
FORKING = """
import os, sys, time
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


def test_untitled_engine_processes_are_found_by_shape_not_counted_as_their_server() -> None:
    import psutil

    from benchmarks.servers import Server

    for marker, server_group in [("ray::ServeReplica:tierserve:ingress", "ingress replica"),
                                 ("vllm.entrypoints.openai.api_server", "vllm api server")]:
        server = subprocess.Popen([sys.executable, "-c", FORKING, marker])
        try:
            root = psutil.Process(server.pid)
            deadline = time.monotonic() + 10
            while len(root.children(recursive=True)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            (core,) = root.children()
            (worker,) = core.children()
            groups = cpu_by_process()
            assert groups[server.pid][0] == server_group
            assert groups[core.pid][0] == "engine core" and groups[worker.pid][0] == "engine worker"
            # The benchmark's idle split (gateway vs engine) uses the same shape.
            tree = Server("x", [], 0, "m", Path("/dev/null"), {}, proc=server).tree_cpu()
            assert tree[server.pid][0] == "gateway"
            assert tree[core.pid][0] == tree[worker.pid][0] == "engine"
        finally:
            for p in psutil.Process(server.pid).children(recursive=True):
                p.kill()
            server.kill()
            server.wait()
