"""The agent-trace benchmark runs end to end (smoke size: a bare vLLM, then `tierserve up` with a tier of 2
replicas routed by session): its files are produced, every request succeeded, the engines' prefix-cache counters
were read on every replica, turns after the first reused the prefix, every session's extra turns landed on one
replica, nothing was left running.

No speed assertion: the ratios and their targets are reported, not asserted (this 2-core machine is shared; a
full run, every system, is the measurement).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchrun import TIMEOUT_S, result_document, run_benchmark

pytestmark = pytest.mark.bench


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_agent_trace_smoke_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run_benchmark("benchmarks.agent_trace", "--smoke", "--out-dir", str(out), "--workdir", str(tmp_path / "work"),
                  "--machine", "smoke")  # fmt: skip

    doc, stem = result_document(out, "agent-trace", (".json", ".md", ".png"))
    w = doc["meta"]["workload"]
    assert (w["sessions"], w["turns"], w["concurrency"]) == (4, 3, 4)
    assert list(doc["results"]) == ["vllm-1", "tierserve-session"]
    tier = doc["meta"]["configs"]["tierserve-session"]["models_yaml"]["tiers"]["bench"]
    assert tier["replicas"]["routing"] == "session" and tier["replicas"]["min"] == 2
    for name, r in doc["results"].items():
        for phase, n in (("turns", 12), ("extra", 8)):
            got = r[phase]
            assert got["requests"] == got["ok"] == n and got["errors"] == 0, (name, phase, got["error_kinds"])
        hr = r["hit_rate"]
        assert hr["rate"] is not None and 0 <= hr["rate"] <= 1, (name, hr)
        assert hr["missing"] == [], (name, hr)
        assert r["ttft_ms"]["p50"] is not None, name
    # Turns after the first resend the conversation: one engine finds its prefix.
    assert doc["results"]["vllm-1"]["hit_rate"]["rate"] > 0
    session = doc["results"]["tierserve-session"]
    assert len(session["hit_rate"]["per_replica"]) == 2, session["hit_rate"]  # both replicas' counters read
    sticky = session["sticky"]
    assert sticky["sessions"] == sticky["named"] == sticky["sticky"] == 4, sticky
    assert [t["ratio"] for t in doc["targets"]] == ["hit_rate_session_over_vllm1", "ttft_p50_session_over_balance"]
    assert doc["targets"][0]["met"] in (True, False) and doc["targets"][1]["met"] is None  # no balance run
    md = stem.with_suffix(".md").read_text()
    assert "| tierserve-session |" in md and "## Targets (reported, not asserted)" in md
