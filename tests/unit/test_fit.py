"""The GPU memory fit check: metadata reading, the weights/KV arithmetic against hand computation, every
shipped profile on its hardware, and `tierserve validate --profile` / `up` with metadata from fixtures."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serving import cli
from serving.config import EngineArgs, ModelSource, load_config
from serving.ops import fit
from tests.support.modelmeta import (
    CATALOG,
    PARAMS,
    QWEN25,
    FixtureLookup,
    checkpoint,
    qwen25_config,
    write_checkpoint,
    write_header_only,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models.yaml"
GIB = 1 << 30
MIB = 1 << 20

# The hardware each shipped profile is for, as NVML reports it (the smallest card of each class: an L40S or
# A40 reports 45 GiB with ECC on, an H100 80GB 79.6 GiB). A new profile must say what it is for here.
HARDWARE: dict[str, list[tuple[str, int]]] = {
    "local": [("24GiB", 1)],  # CPU tiers: the GPU is not used
    "gpu-24gb": [("24564MiB", 1), ("24576MiB", 1)],  # RTX 4090, RTX 3090
    "gpu-48gb": [("46068MiB", 1), ("49140MiB", 1)],  # L40S / A40, RTX 6000 Ada / A6000
    "gpu": [("81559MiB", 1), ("81920MiB", 1)],  # H100 80GB, A100 80GB
    "gpu-2x80gb": [("81559MiB", 2), ("81920MiB", 2)],
    "cluster": [("81559MiB", 2)],  # per node; reasoning's node needs two GPUs
}


@pytest.fixture(scope="module")
def lookup(tmp_path_factory: pytest.TempPathFactory) -> FixtureLookup:
    return FixtureLookup(tmp_path_factory.mktemp("ckpt"), fallback=lambda s: cli.tiny_metadata(s.tiny_seed or 0))


def meta_of(config: dict[str, Any], tensors: dict[str, Any], tmp: Path) -> fit.ModelMetadata:
    return fit.read_model_dir(write_checkpoint(tmp, config, tensors))


# -- hand computation of the Qwen2.5 layouts ---------------------------------------------------------------


def qwen25_counts(config: dict[str, Any]) -> tuple[int, int]:
    """(plain, linear) parameter counts of a Qwen2.5 checkpoint, in closed form: linear are the (out, in)
    projection weights quantization packs; plain the embeddings, lm_head, norms and q/k/v biases."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * 128
    kv = config["num_key_value_heads"] * 128
    per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * inter
    per_layer_plain = (q + 2 * kv) + 2 * h  # biases, two norms
    embeddings = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    return embeddings + h + layers * per_layer_plain, layers * per_layer_linear


SIZES = ["7B", "14B", "32B", "72B"]


@pytest.mark.parametrize("size", SIZES)
def test_bf16_weights_are_two_bytes_per_published_parameter(size: str, tmp_path: Path) -> None:
    config, tensors = checkpoint(qwen25_config(size), "bf16")
    meta = meta_of(config, tensors, tmp_path)
    plain, linear = qwen25_counts(config)
    assert plain + linear == PARAMS[f"Qwen2.5-{size}"] == sum(t.numel for t in meta.tensors.values())
    assert fit.weights_bytes(meta, EngineArgs()) == 2 * PARAMS[f"Qwen2.5-{size}"]
    # fp32 stays 4 bytes when asked; fp8 at load halves the projections, not embeddings, norms, biases.
    assert fit.weights_bytes(meta, EngineArgs(dtype="float32")) == 4 * (plain + linear)
    assert fit.weights_bytes(meta, EngineArgs(quantization="fp8")) == 2 * plain + linear


@pytest.mark.parametrize("size", SIZES)
def test_awq_int4_group128_weights(size: str, tmp_path: Path) -> None:
    # The 72B AWQ repo pads its MLP to 29696 so the int4 groups split under tensor parallelism.
    config, tensors = checkpoint(qwen25_config(size, intermediate=29696 if size == "72B" else None), "awq")
    meta = meta_of(config, tensors, tmp_path)
    plain, linear = qwen25_counts(config)
    # Per projection weight: 4 bits, plus an int4 zero and an fp16 scale per group of 128 inputs.
    per_weight = 0.5 + 0.5 / 128 + 2 / 128
    assert fit.weights_bytes(meta, EngineArgs(quantization="awq_marlin")) == 2 * plain + int(linear * per_weight)
    assert meta.quant_method == "awq"


def test_gptq_int4_weights(tmp_path: Path) -> None:
    config, tensors = checkpoint(qwen25_config("7B"), "gptq")
    meta = meta_of(config, tensors, tmp_path)
    plain, linear = qwen25_counts(config)
    # As AWQ, plus an int32 group index per input of each projection.
    inputs = 28 * (4 * 3584 + 2 * 3584 + 18944)  # q, k, v, o, gate, up take the hidden size; down the MLP's
    per_weight = 0.5 + 0.5 / 128 + 2 / 128
    assert fit.weights_bytes(meta, EngineArgs(quantization="gptq_marlin")) == (
        2 * plain + int(linear * per_weight) + 4 * inputs)


@pytest.mark.parametrize("size", SIZES)
def test_fp8_block_quantized_weights(size: str, tmp_path: Path) -> None:
    config, tensors = checkpoint(qwen25_config(size), "fp8")
    meta = meta_of(config, tensors, tmp_path)
    plain, linear = qwen25_counts(config)
    # One byte per projection weight and a bf16 scale per 128 x 128 block (these shapes divide evenly).
    assert fit.weights_bytes(meta, EngineArgs(quantization="fp8")) == 2 * plain + linear + 2 * linear // 128**2


@pytest.mark.parametrize("size", SIZES)
def test_kv_cache_per_token(size: str, tmp_path: Path) -> None:
    _, _, layers, _, kv_heads = QWEN25[size]
    config, tensors = checkpoint(qwen25_config(size), "bf16")
    meta = meta_of(config, tensors, tmp_path)
    per_token = layers * kv_heads * 128 * 2 * 2  # K and V, 16-bit
    assert fit.kv_bytes_per_token(meta, EngineArgs()) == per_token
    assert fit.kv_bytes_per_token(meta, EngineArgs(extra={"kv_cache_dtype": "fp8"})) == per_token // 2
    # Tensor parallelism splits the heads, it doesn't change the total; beyond the head count it replicates.
    assert fit.kv_bytes_per_token(meta, EngineArgs(tensor_parallel_size=2)) == per_token
    assert fit.kv_bytes_per_token(meta, EngineArgs(tensor_parallel_size=16)) == per_token * 16 // kv_heads


def test_head_dim_comes_from_config_or_hidden_over_heads() -> None:
    base = {"num_hidden_layers": 2, "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_size": 5120}
    explicit = fit.ModelMetadata({**base, "head_dim": 128}, {}, "t")
    derived = fit.ModelMetadata(base, {}, "t")
    assert fit.kv_bytes_per_token(explicit, EngineArgs()) == 2 * 8 * 128 * 2 * 2  # Qwen3-32B: 128, not 80
    assert fit.kv_bytes_per_token(derived, EngineArgs()) == 2 * 8 * 80 * 2 * 2


def test_plan_numbers_follow_from_the_share(tmp_path: Path) -> None:
    config, tensors = checkpoint(qwen25_config("7B"), "awq")
    meta = meta_of(config, tensors, tmp_path)
    tier = load_config(MODELS, "gpu").tiers["coder"].model_copy(
        update={"engine": EngineArgs(max_model_len=16384, gpu_memory_utilization=0.5, quantization="awq_marlin")})
    plan, problems = fit.plan_tier("coder", tier, meta, fit.Hardware(24 * GIB, 1))
    assert problems == []
    assert plan.share_bytes == 12 * GIB
    assert plan.kv_budget_bytes == 12 * GIB - plan.weights_bytes - plan.overhead_bytes
    per_seq = 28 * 4 * 128 * 4 * 16384
    assert plan.sequences == plan.kv_budget_bytes // per_seq >= 1


# -- reading metadata --------------------------------------------------------------------------------------


def test_header_reader_reads_real_safetensors_and_header_only_files(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {"a": np.zeros((3, 4), dtype=np.float16), "b": np.zeros((5,), dtype=np.int32)}
    save_file(arrays, tmp_path / "r.safetensors")
    assert fit.read_safetensors_header(tmp_path / "r.safetensors") == {
        "a": fit.Tensor("F16", (3, 4)), "b": fit.Tensor("I32", (5,))}
    write_header_only(tmp_path / "h.safetensors", {"w": ("BF16", (7, 2))})
    raw = (tmp_path / "h.safetensors").read_bytes()
    assert len(raw) == 8 + struct.unpack("<Q", raw[:8])[0]  # no data after the header
    assert fit.read_safetensors_header(tmp_path / "h.safetensors") == {"w": fit.Tensor("BF16", (7, 2))}
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    with pytest.raises(fit.MetadataError, match="not a safetensors file"):
        fit.read_safetensors_header(tmp_path / "bad.safetensors")


def test_model_dir_without_config_or_weights_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(fit.MetadataError, match=r"no config\.json"):
        fit.read_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(fit.MetadataError, match=r"no \*\.safetensors"):
        fit.read_model_dir(tmp_path)


def test_local_path_source_reads_the_directory(tmp_path: Path, lookup: FixtureLookup) -> None:
    directory = lookup.directory("Qwen/Qwen2.5-7B-Instruct-AWQ")
    meta = fit.HubLookup()(ModelSource(path=str(directory)))
    assert meta.quant_method == "awq" and meta.origin == str(directory)


def test_tiny_model_recipe_matches_the_generated_model(tmp_path: Path) -> None:
    from serving.backends.tinymodel import cached_tiny_model

    real = cli.tiny_metadata(1, cached_tiny_model(tmp_path, 1).parents[1])
    recipe = cli.tiny_metadata(1)
    assert real.origin != recipe.origin  # the generated directory was read
    e = EngineArgs(dtype="float32")
    assert fit.kv_bytes_per_token(real, e) == fit.kv_bytes_per_token(recipe, e) == 2 * 2 * 64 * 2 * 4
    # The trained tokenizer may stop a few tokens short of the recipe's vocabulary: the recipe is an upper bound.
    assert 0 <= fit.weights_bytes(recipe, e) - fit.weights_bytes(real, e) < 0.01 * fit.weights_bytes(real, e)


def hub_cache(root: Path, repo: str, directory: Path) -> None:
    """A Hugging Face cache entry for `repo` at `main` holding `directory`'s files."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in directory.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_hub_lookup_reads_the_local_cache_and_says_when_offline(
    tmp_path: Path, lookup: FixtureLookup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path / "hub", "Qwen/Qwen3-8B-AWQ", lookup.directory("Qwen/Qwen3-8B-AWQ"))
    hub = fit.HubLookup()
    cached = hub(ModelSource(repo="Qwen/Qwen3-8B-AWQ"))
    assert cached.quant_method == "awq" and cached.config["num_hidden_layers"] == 36
    with pytest.raises(fit.MetadataError) as info:
        hub(ModelSource(repo="Qwen/Qwen3-32B-AWQ"))
    message = str(info.value)
    assert message.startswith("Qwen/Qwen3-32B-AWQ@main: not in the local Hugging Face cache and the hub is unreachable")
    assert "tierserve fetch-models" in message and "Traceback" not in message


# -- profiles ----------------------------------------------------------------------------------------------


def test_every_shipped_profile_says_its_hardware() -> None:
    import yaml

    assert set(yaml.safe_load(MODELS.read_text())["profiles"]) == set(HARDWARE)


@pytest.mark.parametrize(("profile", "memory", "gpus"),
                         [(p, m, n) for p, hws in HARDWARE.items() for m, n in hws])
def test_every_shipped_profile_fits_its_hardware(profile: str, memory: str, gpus: int, lookup: FixtureLookup) -> None:
    config = load_config(MODELS, profile)
    report = fit.check_fit(config, fit.Hardware(fit.parse_size(memory), gpus), lookup)
    assert report.ok, "\n".join(report.problems)
    assert {p.tier for p in report.plans} == set(config.tiers)
    assert all(p.sequences >= 1 for p in report.plans)
    gpu_tiers = [t for t in config.tiers.values() if t.resources.gpus > 0]
    assert all(t.cost_per_gpu_hour_usd is not None for t in gpu_tiers)  # every GPU profile prices its tiers


def test_qwen25_names_stay_reachable_in_every_gpu_profile() -> None:
    for profile in HARDWARE:
        if profile == "local":
            continue
        names = load_config(MODELS, profile).model_names()
        assert {"qwen2.5-coder", "qwen2.5-32b", "qwen2.5-7b", "qwen2.5-7b-instruct"} <= set(names), profile


def test_the_80gb_profile_fails_on_40gb_naming_tier_and_numbers(lookup: FixtureLookup) -> None:
    report = fit.check_fit(load_config(MODELS, "gpu"), fit.Hardware(40 * GIB, 1), lookup)
    assert not report.ok
    reasoning = next(p for p in report.problems if p.startswith("tiers.reasoning:"))
    assert "18.0 GiB of weights + 1.2 GiB of activations/overhead leave no KV cache in the 18.4 GiB share " \
           "(0.46 x 40.0 GiB)" in reasoning
    assert "gpu_memory_utilization" in reasoning and "smaller/quantized model" in reasoning
    coder = next(p for p in report.problems if p.startswith("tiers.coder:"))
    assert "one 32768-token sequence needs 6.0 GiB of KV cache (192 KiB/token)" in coder
    assert "lower max_model_len to 8192" in coder
    gpu = next(p for p in report.problems if p.startswith("GPU 0:"))
    assert "= 0.97 x 40.0 GiB plus 1.5 GiB of CUDA contexts = 40.3 GiB > 40.0 GiB" in gpu


def test_weights_larger_than_the_share(lookup: FixtureLookup) -> None:
    config = load_config(MODELS, "gpu")
    config = config.model_copy(update={"tiers": {"reasoning": config.tiers["reasoning"]}})
    report = fit.check_fit(config, fit.Hardware(36 * GIB, 1), lookup)
    assert report.problems == (
        "tiers.reasoning: 18.0 GiB of weights > 16.6 GiB share (0.46 x 36.0 GiB); raise "
        "engine.gpu_memory_utilization to 0.76 if the GPU has room, add GPUs (tensor_parallel_size) or pick a "
        "smaller/quantized model",
    )


def test_placement_problems(lookup: FixtureLookup) -> None:
    two = load_config(MODELS, "gpu-2x80gb")
    one_gpu = fit.check_fit(two, fit.Hardware(80 * GIB, 1), lookup)
    assert any(p.startswith("tiers.reasoning: 1 replica(s) x resources.gpus 0.7 do not fit") for p in one_gpu.problems)
    tp = load_config(MODELS, "cluster")
    small_node = fit.check_fit(tp, fit.Hardware(80 * GIB, 1), lookup)
    assert any("engine.tensor_parallel_size 2 needs 2 GPUs on one node; there are 1" in p
               for p in small_node.problems)
    # The cluster's coder may autoscale to two replicas: on one-GPU nodes the second has no room.
    assert any("tiers.coder: only 1 of replicas.max 2" in n for n in small_node.notes)


def test_quantization_must_match_the_checkpoint(lookup: FixtureLookup) -> None:
    config = load_config(MODELS, "gpu")
    fast = config.tiers["fast"]
    wrong = fast.model_copy(update={"engine": fast.engine.model_copy(update={"quantization": "awq_marlin"})})
    _, problems = fit.plan_tier("fast", wrong, lookup(wrong.model), fit.Hardware(80 * GIB, 1))
    assert problems[0].startswith("tiers.fast: engine.quantization awq_marlin does not match "
                                  "Qwen/Qwen3-4B-Instruct-2507-FP8's fp8 quantization; set engine.quantization: fp8")


def test_context_longer_than_the_model_allows(lookup: FixtureLookup) -> None:
    tier = load_config(MODELS, "gpu").tiers["reasoning"]
    longer = tier.model_copy(update={"engine": tier.engine.model_copy(update={"max_model_len": 65536})})
    _, problems = fit.plan_tier("reasoning", longer, lookup(longer.model), fit.Hardware(160 * GIB, 1))
    assert any("engine.max_model_len 65536 > the 40960 tokens Qwen/Qwen3-32B-AWQ allows" in p for p in problems)


@pytest.mark.parametrize(("text", "size"), [("24GiB", 24 * GIB), ("80 GB", 80 * 10**9), ("81920MiB", 80 * GIB),
                                            ("22.5gib", int(22.5 * GIB))])
def test_parse_size(text: str, size: int) -> None:
    assert fit.parse_size(text) == size


@pytest.mark.parametrize("text", ["24", "24XB", "GiB", "-1GiB", "0GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"memory size|more than 0"):
        fit.parse_size(text)


# -- CLI ---------------------------------------------------------------------------------------------------


class FakeNvml:
    """The slice of pynvml the GPU collector reads, for one machine's GPUs (or none: init fails)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, totals: list[int] | None, name: str = "NVIDIA GeForce RTX 4090") -> None:
        self.totals, self.name = totals, name

    def nvmlInit(self) -> None:
        if self.totals is None:
            raise OSError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.totals or [])

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, i: int) -> str:
        return f"GPU-{i}"

    def nvmlDeviceGetName(self, _i: int) -> str:
        return self.name

    def nvmlDeviceGetMemoryInfo(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(total=(self.totals or [])[i], used=0)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)  # every other reading: unsupported


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch, lookup: FixtureLookup) -> FixtureLookup:
    monkeypatch.setattr(fit, "lookup_override", lookup)
    return lookup


def nvml(monkeypatch: pytest.MonkeyPatch, totals: list[int] | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(totals))


def test_validate_prints_the_memory_plan(injected: FixtureLookup, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(MODELS), "--profile", "gpu-24gb", "--gpu-memory", "24564MiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile gpu-24gb on 1 x 24.0 GiB GPU: fits\n")
    header, *rows = out.splitlines()[1:4]
    assert header.split() == ["tier", "model", "gpu", "share", "weights", "overhead", "KV/token", "KV", "budget",
                              "context", "seqs@ctx", "$/h"]
    assert rows[0].split()[:2] == ["coder", "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"]
    assert "56 KiB" in rows[0] and "32768" in rows[0]


def test_validate_fails_with_the_problems(injected: FixtureLookup, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(MODELS), "--profile", "gpu", "--gpu-memory", "40GiB"]) == 1
    captured = capsys.readouterr()
    assert "profile gpu on 1 x 40.0 GiB GPU: 4 problem(s)" in captured.out
    assert ("  tiers.reasoning: 18.0 GiB of weights + 1.2 GiB of activations/overhead leave no KV cache in the "
            "18.4 GiB share (0.46 x 40.0 GiB); raise engine.gpu_memory_utilization to 0.69") in captured.err


def test_validate_several_gpus(injected: FixtureLookup, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(MODELS), "--profile", "gpu-2x80gb", "--gpu-memory", "80GiB"]) == 1
    # One GPU: the coder takes it whole and leaves the others none.
    assert "tiers.reasoning: 1 replica(s) x resources.gpus 0.7 do not fit" in capsys.readouterr().err
    assert cli.main(["validate", str(MODELS), "--profile", "gpu-2x80gb", "--gpu-memory", "80GiB", "--gpus", "2"]) == 0


def test_validate_bad_gpu_memory_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["validate", str(MODELS), "--profile", "gpu", "--gpu-memory", "24XB"])
    assert info.value.code == 2
    assert "argument --gpu-memory: '24XB' is not a memory size (e.g. 24GiB, 80GB, 81920MiB)" in capsys.readouterr().err


def test_validate_gpu_memory_needs_a_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(MODELS), "--gpu-memory", "24GiB"]) == 2
    assert "--gpu-memory and --gpus need --profile NAME" in capsys.readouterr().err


def test_validate_without_nvml_checks_the_schema_only(
    monkeypatch: pytest.MonkeyPatch, injected: FixtureLookup, capsys: pytest.CaptureFixture[str]
) -> None:
    nvml(monkeypatch, None)
    assert cli.main(["validate", str(MODELS), "--profile", "gpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{MODELS}: ok (schema only)\n"
    assert "no GPU memory fit check: no NVIDIA GPU could be read here (NVML unavailable: OSError: NVML Shared " \
           "Library Not Found); pass --gpu-memory SIZE" in captured.err
    assert "WARNING" not in captured.err  # the collector's telemetry warning is not this command's news


def test_validate_reads_the_gpus_with_nvml(
    monkeypatch: pytest.MonkeyPatch, injected: FixtureLookup, capsys: pytest.CaptureFixture[str]
) -> None:
    nvml(monkeypatch, [24564 * MIB])
    assert cli.main(["validate", str(MODELS), "--profile", "gpu-24gb"]) == 0
    assert "profile gpu-24gb on 1 x 24.0 GiB GPU (NVIDIA GeForce RTX 4090): fits" in capsys.readouterr().out
    assert cli.main(["validate", str(MODELS), "--profile", "gpu"]) == 1


def test_validate_without_profile_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(MODELS)]) == 0
    assert capsys.readouterr().out == f"{MODELS}: ok\n"


def up_args(tmp_path: Path, profile: str) -> list[str]:
    return ["up", "--config", str(MODELS), "--profile", profile, "--cache-dir", str(tmp_path)]


def test_up_refuses_a_profile_that_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, injected: FixtureLookup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nvml(monkeypatch, [40 * GIB])
    monkeypatch.setattr(cli, "fetch_models", lambda _args: pytest.fail("started despite the failed check"))
    assert cli.main(up_args(tmp_path, "gpu")) == 1
    err = capsys.readouterr().err
    assert "error: profile gpu does not fit 1 x 40.0 GiB GPU (NVIDIA GeForce RTX 4090); nothing started" in err
    assert "tiers.reasoning: 18.0 GiB of weights + 1.2 GiB of activations/overhead leave no KV cache" in err


def test_up_checks_then_starts_and_skips_without_gpus(
    monkeypatch: pytest.MonkeyPatch, injected: FixtureLookup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[str] = []
    monkeypatch.setattr(cli, "fetch_models", lambda args: started.append(args.profile))  # returns None: stops there
    nvml(monkeypatch, [81559 * MIB])
    assert cli.main(up_args(tmp_path, "gpu")) == 1 and started == ["gpu"]
    assert "profile gpu on 1 x 79.6 GiB GPU (NVIDIA GeForce RTX 4090): fits" in capsys.readouterr().out
    nvml(monkeypatch, None)  # a CPU-only machine, as this one
    assert cli.main(up_args(tmp_path, "local")) == 1 and started == ["gpu", "local"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tierserve: GPU memory fit check skipped: no NVIDIA GPU readable")
    nvml(monkeypatch, [40 * GIB])
    assert cli.main([*up_args(tmp_path, "gpu"), "--no-fit-check"]) == 1 and started[-1] == "gpu"


def test_fixture_catalog_covers_every_profile_model(lookup: FixtureLookup) -> None:
    import yaml

    for profile in yaml.safe_load(MODELS.read_text())["profiles"]:
        for tier in load_config(MODELS, profile).tiers.values():
            assert tier.model.repo is None or tier.model.repo in CATALOG, tier.model.repo
    index = json.loads((lookup.directory("Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8") /
                        "model.safetensors.index.json").read_text())
    assert math.isclose(index["metadata"]["total_size"] / GIB, 29.0, abs_tol=0.1)  # 30.5B, mostly fp8
