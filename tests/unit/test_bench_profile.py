"""`python -m benchmarks --profile NAME`: the launch plan of a profile's tier, checked without starting anything.

The GPU profiles can't run on this machine; their plan (command lines, environments, the generated tierserve
config, the schedule) is what reaches the GPU VM, so it is checked here against the profile itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import cli, report, servers
from benchmarks import profile as profiles
from benchmarks.loadgen import Workload
from serving.config import build_config, load_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models.yaml"
GIB = 1 << 30


def _plan(tmp_path: Path, *argv: str, memory: int | None = 80 * GIB) -> tuple[argparse.Namespace, cli.Plan, Path]:
    args = cli.parse_args(list(argv))
    model = tmp_path / "weights"
    model.mkdir(exist_ok=True)
    work = tmp_path / "work"
    plan = cli.plan_profile(args, [1, 8], ["stream"], work, Workload(128, 64), memory=memory,
                            resolve=lambda pt, cache: model)
    return args, plan, model


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_the_profiles_default_tier_is_measured_unless_one_is_named() -> None:
    assert profiles.select(MODELS, "gpu").name == "fast"
    assert profiles.select(MODELS, "gpu", "coder").name == "coder"
    with pytest.raises(SystemExit, match="no such tier"):
        profiles.select(MODELS, "gpu", "nope")
    with pytest.raises(SystemExit, match="no such profile"):
        profiles.select(MODELS, "nope")


def test_gpu_profile_plan_launches_every_system_on_the_tiers_real_engine(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args, plan, model = _plan(tmp_path, "--profile", "gpu", "--config", str(MODELS))
    tier = load_config(MODELS, "gpu").tiers["fast"]
    assert plan.tier is not None and plan.tier.name == "fast"
    assert plan.model_dir == model and plan.tokenizer_dir == str(model)
    e = tier.engine
    assert e.gpu_memory_utilization <= 0.45 and tier.resources.gpus > 0  # what this test is about
    assert plan.schedule[0] == "together"  # two of its engines fit an 80 GiB GPU
    assert plan.stagger and plan.embed  # the gpu profile embeds `fast` in the ingress
    assert args.served_name == tier.served_name

    made, note = cli.local_servers(args, plan, cli.wanted_systems(args))
    assert list(made) == ["bare", "tierserve"]  # LiteLLM follows once bare vLLM is ready
    bare = made["bare"]
    assert bare.cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(bare.cmd, "--model") == str(model)
    assert _flag(bare.cmd, "--served-model-name") == tier.served_name
    expected = {"--dtype": e.dtype, "--quantization": e.quantization, "--max-model-len": str(e.max_model_len),
                "--gpu-memory-utilization": str(e.gpu_memory_utilization),
                "--tensor-parallel-size": str(e.tensor_parallel_size), "--max-num-seqs": str(e.max_num_seqs),
                "--seed": str(e.seed), "--host": "127.0.0.1"}  # fmt: skip
    assert {k: _flag(bare.cmd, k) for k in expected} == expected
    assert ("--enforce-eager" in bare.cmd) == e.enforce_eager  # CUDA graphs as the tier runs them
    assert "VLLM_CPU_KVCACHE_SPACE" not in bare.env  # the CPU engine's setting is not a GPU tier's
    assert "RAY_ADDRESS" not in bare.env

    ts = made["tierserve"]
    cfg = Path(_flag(ts.cmd, "--config"))
    assert ts.cmd[:2] == [servers.bin_of("tierserve"), "up"] and _flag(ts.cmd, "--profile") == "bench"
    assert not cfg.exists() and ts.api_key == ""  # nothing written or started while planning
    doc = note["config"]
    bench = doc["tiers"]["bench"]
    assert bench["engine"] == tier.engine.model_dump(mode="json")
    assert bench["model"] == {"path": str(model)}
    assert bench["served_name"] == tier.served_name and bench["aliases"] == tier.aliases
    assert bench["resources"]["gpus"] == tier.resources.gpus and bench["resources"]["custom"] == {}
    assert bench["replicas"] == {"min": 1, "max": 1}
    assert bench["cost_per_gpu_hour_usd"] == tier.cost_per_gpu_hour_usd
    assert doc["ingress"]["embed_tier"] == "bench"
    # Features on: the bare vLLM is the fallback provider; the cold fallback tier never schedules.
    assert note["features_configured"]
    assert doc["providers"][0]["base_url"] == bare.base_url
    cold = doc["tiers"]["bench-fallback"]
    assert cold["resources"]["custom"] == {"tierserve_bench_unschedulable": 1} and cold["aliases"] == []
    assert build_config(doc, "bench").tiers["bench"].engine == tier.engine  # tierserve loads the same engine

    lite = servers.litellm_proxy(args.served_name, bare.base_url, plan.workdir)
    assert lite.model == tier.served_name


def test_cluster_tier_drops_node_pinning_and_keeps_tensor_parallelism(tmp_path: Path) -> None:
    args, plan, _ = _plan(tmp_path, "--profile", "cluster", "--tier", "reasoning", "--config", str(MODELS),
                              "--systems", "bare,tierserve", memory=80 * GIB)
    tier = load_config(MODELS, "cluster").tiers["reasoning"]
    assert tier.resources.custom and tier.engine.tensor_parallel_size > 1  # what this test is about
    assert not plan.embed  # the cluster profile embeds no tier
    together = profiles.engines_fit_together(tier.engine, 2, 80 * GIB)
    assert plan.schedule[0] == ("together" if together else "apart")
    made, note = cli.local_servers(args, plan, ["bare", "tierserve"])
    cmd = made["bare"].cmd
    assert _flag(cmd, "--tensor-parallel-size") == str(tier.engine.tensor_parallel_size)
    assert _flag(cmd, "--dtype") == tier.engine.dtype
    assert ("--quantization" in cmd) == (tier.engine.quantization is not None)
    bench = note["config"]["tiers"]["bench"]
    assert bench["resources"]["custom"] == {} and bench["resources"]["gpus"] == tier.resources.gpus
    assert "embed_tier" not in note["config"]["ingress"]


def _catalog(tmp_path: Path, tiers: dict[str, dict]) -> Path:
    """A models.yaml with one GPU profile `p` of these tiers (name -> engine and resources)."""
    doc = {"version": 1, "tiers": {name: {"served_name": f"{name}-m", "model": {"repo": f"org/{name}"}, **t}
                                   for name, t in tiers.items()},
           "profiles": {"p": {}}}  # fmt: skip
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_schedule_keeps_engines_together_only_where_two_fit(tmp_path: Path) -> None:
    gpu = {"resources": {"gpus": 0.5}}
    models = _catalog(tmp_path, {
        "big": {"engine": {"gpu_memory_utilization": 0.92}, **gpu},
        "small": {"engine": {"gpu_memory_utilization": 0.27}, **gpu},
        "mid": {"engine": {"gpu_memory_utilization": 0.46}, **gpu},
        "cpu": {"engine": {"gpu_memory_utilization": 0.9}, "resources": {"gpus": 0}},
    })  # fmt: skip
    wanted = ["bare", "tierserve", "litellm"]
    big, small, mid, cpu = (profiles.select(models, "p", t) for t in ("big", "small", "mid", "cpu"))
    assert profiles.schedule(big, wanted, "auto", 80 * GIB)[0] == "apart"
    assert profiles.schedule(big, wanted, "together", 80 * GIB)[0] == "together"
    assert profiles.schedule(big, ["tierserve"], "auto", 80 * GIB)[0] == "together"  # one engine
    assert profiles.schedule(big, ["bare", "litellm"], "auto", 80 * GIB)[0] == "together"  # LiteLLM shares bare's
    assert profiles.schedule(small, wanted, "auto", 24 * GIB)[0] == "together"
    assert profiles.schedule(small, wanted, "auto", None)[0] == "together"
    # The CUDA contexts decide on a small GPU: 2 x (0.46 x 12 GiB + 0.5 GiB) > 12 GiB.
    assert profiles.schedule(mid, wanted, "auto", 12 * GIB)[0] == "apart"
    assert profiles.schedule(mid, wanted, "auto", 80 * GIB)[0] == "together"
    assert profiles.schedule(cpu, wanted, "auto", None)[0] == "together"
    assert profiles.select(models, "p").name == "big"  # no `fast` tier: the first, as the router does


def test_engine_extra_args_env_and_paid_providers_reach_the_plan(tmp_path: Path) -> None:
    doc = yaml.safe_load(MODELS.read_text())
    doc["providers"] = [{"name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1",
                         "api_key_env": "OPENAI_API_KEY", "default_model": "gpt-4.1-mini", "paid": True,
                         "price_input_per_1m_usd": 0.4, "price_output_per_1m_usd": 1.6}]  # fmt: skip
    doc["profiles"]["gpu-test"] = {"tiers": {"coder": {
        "engine": {"max_model_len": 16384, "gpu_memory_utilization": 0.4, "enforce_eager": True,
                   "extra": {"enable_prefix_caching": False, "kv_cache_dtype": "fp8",
                             "limit_mm_per_prompt": {"image": 0}, "max_num_batched_tokens": 8192}},
        "resources": {"gpus": 0.5, "env": {"VLLM_ATTENTION_BACKEND": "FLASHINFER"}},
        "cost_per_hour_usd": 0.6,
    }}}  # fmt: skip
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(doc, sort_keys=False))
    args, plan, _ = _plan(tmp_path, "--profile", "gpu-test", "--tier", "coder", "--config", str(models),
                              "--provider-price", "anthropic=3/15")
    made, note = cli.local_servers(args, plan, ["bare", "tierserve"])
    cmd = made["bare"].cmd
    assert _flag(cmd, "--quantization") == "awq_marlin" and _flag(cmd, "--max-model-len") == "16384"
    assert "--enforce-eager" in cmd and "--no-enable-prefix-caching" in cmd
    assert _flag(cmd, "--kv-cache-dtype") == "fp8" and _flag(cmd, "--limit-mm-per-prompt") == '{"image":0}'
    assert _flag(cmd, "--max-num-batched-tokens") == "8192"
    assert made["bare"].env["VLLM_ATTENTION_BACKEND"] == "FLASHINFER"
    bench = note["config"]["tiers"]["bench"]
    assert bench["engine"]["extra"]["limit_mm_per_prompt"] == {"image": 0}
    assert bench["resources"]["env"] == {"VLLM_ATTENTION_BACKEND": "FLASHINFER"}

    # The cost block prices the tier at its own price and breaks even against both providers.
    results = {"stream": {n: {1: {"output_tok_per_s": 100.0}, 8: {"output_tok_per_s": 600.0}}
                          for n in ("bare", "tierserve")}}  # fmt: skip
    block = cli.cost_block(args, plan, results)
    tier_cost = block["tier"]
    assert tier_cost["tier"] == "coder" and tier_cost["hourly_usd"] == 0.6
    assert [b["provider"] for b in tier_cost["break_even"]] == ["openai", "anthropic"]
    assert tier_cost["break_even"][0]["usd_per_1m_output_tokens_with_mix"] == pytest.approx(1.6 + 2 * 0.4)
    assert tier_cost["caveat"] == cli.GPU_COST_CAVEAT


def test_local_profile_runs_here_with_the_cpu_engine_settings(tmp_path: Path) -> None:
    args, plan, _ = _plan(tmp_path, "--profile", "local", "--config", str(MODELS), memory=None)
    assert plan.tier is not None and not plan.tier.on_gpu
    assert plan.schedule[0] == "together" and not plan.stagger
    made, note = cli.local_servers(args, plan, ["bare", "tierserve"])
    cmd = made["bare"].cmd
    assert _flag(cmd, "--dtype") == "float32" and "--enforce-eager" in cmd
    e = load_config(MODELS, "local").tiers["fast"].engine
    assert _flag(cmd, "--max-model-len") == str(e.max_model_len) and _flag(cmd, "--max-num-seqs") == str(e.max_num_seqs)
    assert made["bare"].env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert made["bare"].model == load_config(MODELS, "local").tiers["fast"].served_name
    assert note["config"]["tiers"]["bench"]["resources"]["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_a_gpu_tier_on_a_machine_without_gpus_stops_before_any_download(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiles, "gpu_memory", lambda: (None, "NVML unavailable: no driver"))

    def no_download(pt: object, cache: Path) -> Path:
        raise AssertionError("resolved the weights")

    args = cli.parse_args(["--profile", "gpu", "--config", str(MODELS)])
    with pytest.raises(SystemExit, match=r"runs on a GPU.*no driver"):
        cli.plan_profile(args, [1], ["stream"], tmp_path, Workload(128, 64), resolve=no_download)


@pytest.mark.parametrize("extra", [["--max-model-len", "1024"], ["--max-num-seqs", "8"],
                                   ["--target", "bare=http://x/v1"], ["--prompt-tokens", "40000"],
                                   ["--systems", "bare,bare-colocated"]])
def test_profile_flags_that_would_change_the_tier_are_refused(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit):
        _plan(tmp_path, "--profile", "gpu", "--config", str(MODELS), *extra)


def test_without_profile_the_cpu_launch_is_unchanged(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    args = cli.parse_args(["--model-dir", str(model), "--workdir", str(tmp_path / "work")])
    plan = cli.plan_run(args)
    assert plan.tier is None and plan.schedule[0] == "together" and not plan.stagger
    made, note = cli.local_servers(args, plan, ["bare", "tierserve", "litellm"])
    bare = made["bare"]
    port = str(bare.port)
    assert bare.cmd == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", "tiny-bench", "--host", "127.0.0.1", "--port", port, "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "256", "--seed", "0",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert bare.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    doc = note["config"]
    assert doc == servers.tierserve_config(model, "tiny-bench", 512, 256, bare.base_url, True, True)
    assert doc["tiers"]["bench"]["engine"] == {"max_model_len": 512, "dtype": "float32", "enforce_eager": True,
                                               "max_num_seqs": 256, "seed": 0, "quantization": None}
    assert doc["tiers"]["bench"]["resources"]["colocate_engine_core"] is True


def test_staggered_start_waits_for_each_engine_before_the_next(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    args, plan, _ = _plan(tmp_path, "--profile", "gpu", "--config", str(MODELS), "--systems", "bare,tierserve")
    events: list[str] = []
    fake = {n: servers.Server(n, ["true"], 1, "m", tmp_path / f"{n}.log", {}) for n in ("bare", "tierserve")}
    monkeypatch.setattr(cli, "local_servers", lambda *a: (fake, {"config": {}}))
    monkeypatch.setattr(cli, "launch", lambda started, *new: events.extend(f"start {s.name}" for s in new))
    monkeypatch.setattr(servers, "wait_ready", lambda ss, *a: events.extend(f"ready {s.name}" for s in ss))
    cli.start_local(args, plan, cli.Systems(), ["bare", "tierserve"])
    assert events == ["start bare", "ready bare", "start tierserve", "ready tierserve"]


def test_apart_results_merge_in_report_order() -> None:
    def level(x: float) -> dict:
        return {"output_tok_per_s": x}

    first = cli.Measured({"stream": {"bare": {1: level(1)}, "litellm": {1: level(2)}}}, {"stream": {"bare": {}}},
                         {"auto_routing": {"available": False}}, {"bare": {"gateway_pct_core": 1.0}})
    second = cli.Measured({"stream": {"tierserve": {1: level(3)}}}, {"stream": {"tierserve": {}}},
                          {"auto_routing": {"available": True}}, {"tierserve": {"gateway_pct_core": 2.0}})
    probes = second.probes
    merged = cli.merge_measured([first, second], ["bare", "tierserve", "litellm"], probes)
    assert list(merged.results["stream"]) == ["bare", "tierserve", "litellm"]
    assert merged.probes is probes and set(merged.idle) == {"bare", "tierserve"}


def test_profile_document_renders_the_tier_cost_and_notes(tmp_path: Path) -> None:
    args, plan, _ = _plan(tmp_path, "--profile", "gpu", "--config", str(MODELS), "--provider-price", "openai=2/8")
    summary = {"requests": 8, "ok": 8, "errors": 0, "req_per_s": 1.0, "output_tok_per_s": 1200.0,
               "ttft_ms": {"p50": 20.0, "p95": 30.0, "p99": 31.0}, "itl_ms": {"p50": 5.0, "p95": 6.0},
               "max_chunk_gap_ms": {"p50": 6.0, "p95": 9.0}, "e2e_ms": {"p50": 400.0, "p95": 420.0, "p99": 430.0},
               "load_avg_1m_after": 0.5}  # fmt: skip
    systems = cli.Systems(endpoints={n: {"url": "u", "model": "m", "api_key": ""} for n in ("bare", "tierserve")})
    measured = cli.Measured({"stream": {n: {8: dict(summary)} for n in ("bare", "tierserve")}}, {}, {}, {})
    doc = cli.document(args, plan, systems, measured, dt.datetime.now().astimezone(), {"cores": 16})
    assert doc["meta"]["profile"]["tier"] == "fast" and doc["meta"]["profile"]["schedule"] == "together"
    assert cli.file_stem(doc["meta"]) == f"{doc['meta']['date']}-{doc['meta']['machine']}-gpu-fast"
    fast = load_config(MODELS, "gpu").tiers["fast"]
    assert fast.cost_per_gpu_hour_usd is not None
    assert doc["cost"]["tier"]["hourly_usd"] == pytest.approx(fast.cost_per_gpu_hour_usd * fast.resources.gpus)
    md = report.markdown(doc, [])
    assert "## Cost per 1M output tokens, and break-even (tier `fast`)" in md
    assert "| openai | 2.00 | 8.00 | 12.000 |" in md
    assert "tier `fast`'s engine settings" in md and "--profile gpu" in md


def test_the_shipped_system_is_tierserve_up_on_the_profile_as_a_user_runs_it(tmp_path: Path) -> None:
    # Without --profile, `tierserve-shipped` measures what `tierserve up` starts by default.
    args = cli.parse_args(["--systems", "bare,tierserve-shipped", "--workdir", str(tmp_path / "work"),
                           "--model-dir", str(tmp_path)])  # fmt: skip
    plan = cli.plan_run(args)
    assert plan.tier is not None and plan.tier.profile == "local" and plan.tier.name == "fast"
    made, _ = cli.local_servers(args, plan, ["bare", "tierserve-shipped"])
    shipped = made["tierserve-shipped"]
    port = str(shipped.port)
    assert shipped.cmd == [servers.bin_of("tierserve"), "up", "--config", str(MODELS), "--profile", "local",
                           "--host", "127.0.0.1", "--port", port]  # fmt: skip
    assert shipped.model == made["bare"].model == "tiny-fast"
    assert shipped.env["TIERSERVE_STATE_DIR"] == str(tmp_path / "work" / "shipped-state")
    assert shipped.setup is None  # the local profile has auth off: no key to create
    # A profile with auth on: the load generator gets its agent key before the start.
    _, gpu_plan, _ = _plan(tmp_path, "--profile", "gpu", "--config", str(MODELS), "--cache-dir", str(tmp_path))
    gpu = profiles.tierserve_shipped(gpu_plan.tier, tmp_path, str(tmp_path))
    assert gpu.setup is not None and _flag(gpu.cmd, "--cache-dir") == str(tmp_path)


def test_the_shipped_targets_are_checked_on_its_ratios_to_bare() -> None:
    def level(tok: float, ttft: float) -> dict:
        return {"output_tok_per_s": tok, "req_per_s": 1.0, "ttft_ms": {"p50": ttft, "p95": ttft},
                "e2e_ms": {"p50": 1.0, "p95": 1.0}}  # fmt: skip

    results = {"stream": {"bare": {1: level(100, 20), 16: level(1000, 50), 64: level(2000, 80)},
                          "tierserve-shipped": {1: level(99, 31), 16: level(950, 60), 64: level(1500, 200)}}}
    rat = report.ratios(results, of="tierserve-shipped", against=("bare",))
    assert rat["tierserve-shipped/bare"]["stream"][64]["output_tok_per_s"] == 0.75
    checked = report.targets(rat)["stream"]
    assert checked["shipped_throughput>=0.9x_bare"] == {16: True, 64: False}
    assert checked["shipped_ttft_p50<=bare+10ms"] == {1: False}  # +11 ms


def test_a_crashed_comparison_proxy_is_restarted_and_its_level_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lite = servers.Server("litellm", [sys.executable, "-c", "import os; os.kill(os.getpid(), 11)"], 1, "m",
                          tmp_path / "litellm.log", {})  # fmt: skip
    bare = servers.Server("bare", [sys.executable, "-c", "pass"], 2, "m", tmp_path / "bare.log", {})
    systems = cli.Systems(started=[bare, lite])
    for s in systems.started:
        s.start()
        s.proc.wait(30)
    lite.log_path.write_text("Fatal Python error: Segmentation fault\n")
    starts: list[str] = []
    monkeypatch.setattr(servers, "wait_ready", lambda ss, *a: starts.extend(s.name for s in ss))
    args = cli.parse_args([])
    prog = cli.Progress(0, False)
    assert not cli.restarted(args, systems, "bare", "stream c=4", prog)  # vLLM's death is a finding, not retried
    assert cli.restarted(args, systems, "litellm", "stream c=4", prog) and starts == ["litellm"]
    lite.proc.wait(30)
    assert systems.crashes == [{"system": "litellm", "level": "stream c=4", "exit_code": -11,
                                "log_tail": "Fatal Python error: Segmentation fault\n"}]  # fmt: skip
    # Dead again on the same level: no second restart (check_alive then stops the run).
    assert not cli.restarted(args, systems, "litellm", "stream c=4", prog) and starts == ["litellm"]
    assert "litellm exited with -11 during stream c=4" in cli.crash_notes(systems.crashes)[0]
