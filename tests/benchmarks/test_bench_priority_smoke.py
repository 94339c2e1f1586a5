"""The priority benchmark runs end to end on a real `tierserve up` (smoke size, the `slots` policy only: priority
scheduling and batch slots): its files are produced, every request succeeded, the tier really had requests
waiting (batch ones in the gateway for a slot), nothing was left running.

No speed assertion: the saturated/idle ratio and its target are reported, not asserted (this 2-core machine is
shared; a full run, every policy, is the measurement).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchrun import TIMEOUT_S, result_document, run_benchmark

pytestmark = pytest.mark.bench


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_priority_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_benchmark("benchmarks.priority", "--smoke", "--policies", "slots", "--out-dir", str(out),
                  "--workdir", str(tmp_path / "work"), "--machine", "smoke")  # fmt: skip

    doc, stem = result_document(out, "priority")
    w = doc["meta"]["workload"]
    assert (w["interactive_requests"], w["batch_streams"], w["batch_tokens"]) == (4, 2 * w["max_num_seqs"], 64)
    assert list(doc["results"]) == ["slots"] and doc["meta"]["batch_slots"] == w["max_num_seqs"] - 1
    assert doc["meta"]["tierserve_config"]["slots"]["tiers"]["bench"]["slots"] == {
        "batch_per_replica": w["max_num_seqs"] - 1}
    r = doc["results"]["slots"]
    for phase in ("warmup", "idle", "saturated"):
        assert r[phase]["errors"] == 0 and r[phase]["ok"] == r[phase]["requests"], (phase, r[phase]["error_kinds"])
    for phase in ("idle", "saturated"):
        assert r[phase]["requests"] == 4, phase
        assert r[phase]["ttft_ms"]["p50"] is not None and r[phase]["ttft_ms"]["p95"] is not None, phase
    assert r["ratio_p95"] is not None and r["target_met"] in (True, False)
    # The saturated phase really saturated the tier: requests were reported waiting during the window.
    assert r["waiting"]["observed"] and r["waiting"]["max"] >= 1, r["waiting"]
    batch = r["batch"]
    assert batch["errors"] == 0, batch["error_kinds"]
    assert batch["streams_started"] >= w["batch_streams"] and batch["output_tok_per_s"] > 0, batch
    assert doc["target"] == {"ratio_p95_max": 2.0, "policy": "slots", "met": r["target_met"]}
    assert doc["comparison"] == {}  # one policy: nothing to compare
    md = stem.with_suffix(".md").read_text()
    assert "| slots |" in md and "## Target (reported, not asserted)" in md
