"""The benchmark runs end to end on real servers (smoke sweep): files are produced, every request succeeded.

No speed assertion: this 2-core machine is shared, the numbers are noise; the committed full sweep under
benchmarks/results/ is the measurement.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.support.benchrun import ROOT, TIMEOUT_S, run_benchmark

pytestmark = pytest.mark.bench


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_smoke_sweep_end_to_end(tmp_path: Path) -> None:
    # find_spec, not import: importing litellm here would try to fetch its price map from the internet.
    for module in ("litellm", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the benchmark needs {module} (litellm[proxy], matplotlib: see benchmarks/README.md)")
    out = tmp_path / "results"
    output = run_benchmark("benchmarks", "--sweep", "smoke", "--out-dir", str(out),
                           "--workdir", str(tmp_path / "work"), "--machine", "smoke", "--warmup", "2",
                           "--probe-pairs", "4", "--no-progress", "--systems",
                           "bare,bare-colocated,tierserve,litellm")  # fmt: skip

    stems = sorted(p.stem for p in out.glob("*-smoke.json"))
    assert len(stems) == 1, sorted(p.name for p in out.iterdir())
    stem = out / stems[0]
    for suffix in (".json", ".md", "-throughput.png", "-ttft.png"):
        path = Path(str(stem) + suffix)
        assert path.is_file() and path.stat().st_size > 0, path

    doc = json.loads(stem.with_suffix(".json").read_text())
    assert doc["meta"]["stop_problems"] == []  # every process stopped cleanly, no VLLM:: left
    # The placement baseline really had its engine core moved (serving/backends/affinity.py on bare vLLM's tree).
    assert "bare-colocated: engine core" in output, output[-4000:]
    systems = ("bare", "bare-colocated", "tierserve", "litellm")
    for mode in ("stream", "nonstream"):
        for system in systems:
            levels = doc["results"][mode][system]
            assert sorted(int(c) for c in levels) == [1, 4]
            for c, r in levels.items():
                where = f"{mode}/{system}/c={c}"
                assert r["requests"] > 0 and r["errors"] == 0, (where, r["error_kinds"])
                assert r["ok"] == r["requests"], where
                # The forced length arrived: every request produced exactly the asked-for tokens.
                assert r["mean_output_tokens"] == doc["meta"]["workload"]["output_tokens"], (where, r)
                if mode == "stream":
                    assert r["ttft_ms"]["p50"] is not None, where
    for name in ("tierserve/bare", "tierserve/bare-colocated", "tierserve/litellm"):
        assert set(doc["ratios"][name]) == {"stream", "nonstream"}
    assert set(doc["probes"]) == {"auto_routing", "fallback_hop"}
    md = stem.with_suffix(".md").read_text()
    assert "## Ratios" in md and "Cost per 1M output tokens" in md


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_smoke_shipped_appliance_against_bare(tmp_path: Path) -> None:
    """`tierserve-shipped` is `tierserve up` on the repository's models.yaml, every tier of the default profile,
    measured on its default tier against bare vLLM on that tier's model and engine settings."""
    from serving.config import Settings, load_config

    out, work = tmp_path / "results", tmp_path / "work"
    output = run_benchmark("benchmarks", "--sweep", "smoke", "--modes", "stream", "--out-dir", str(out),
                           "--workdir", str(work), "--cache-dir", str(tmp_path / "cache"), "--machine", "smoke",
                           "--warmup", "2", "--probe-pairs", "0", "--idle-seconds", "0", "--no-progress",
                           "--systems", "bare,tierserve-shipped")  # fmt: skip
    stems = sorted(p.stem for p in out.glob("*-smoke-*.json"))  # named for the profile and tier measured
    assert len(stems) == 1, sorted(p.name for p in out.iterdir())
    doc = json.loads((out / stems[0]).with_suffix(".json").read_text())
    assert doc["meta"]["stop_problems"] == []
    config = load_config(ROOT / "models.yaml", Settings().profile)
    tier = config.tiers[config.routing.default_tier]
    assert doc["meta"]["endpoints"]["tierserve-shipped"]["model"] == tier.served_name
    for system in ("bare", "tierserve-shipped"):
        levels = doc["results"]["stream"][system]
        assert sorted(int(c) for c in levels) == [1, 4]
        for c, r in levels.items():
            assert r["requests"] > 0 and r["ok"] == r["requests"], (system, c, r["error_kinds"])
            assert r["mean_output_tokens"] == doc["meta"]["workload"]["output_tokens"], (system, c)
    assert set(doc["ratios"]["tierserve-shipped/bare"]["stream"]) == {"1", "4"}
    assert set(doc["targets"]["stream"]) >= {"shipped_throughput>=0.9x_bare", "shipped_ttft_p50<=bare+10ms"}
    # What `tierserve up` started: every tier of the profile, not a one-tier benchmark config.
    log = (work / "tierserve-shipped.log").read_text(errors="replace")
    assert all(f"tier {name}: preparing" in log for name in config.tiers), log[-3000:]
    assert "tierserve-shipped ready" in output
