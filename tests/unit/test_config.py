"""models.yaml schema: every kind of bad value is reported with its YAML path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import ConfigError, build_config, deep_merge, load_config, validate_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "models.yaml").read_text())


def problems_for(data: dict[str, Any], profile: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(data, profile)
    return info.value.problems


def test_shipped_file_and_every_profile_validate(catalog: dict[str, Any]) -> None:
    assert validate_file(ROOT / "models.yaml") == []
    assert set(catalog["profiles"]) >= {"local", "gpu", "cluster"}
    local = load_config(ROOT / "models.yaml", "local")
    assert set(local.tiers) == {"coder", "reasoning", "fast", "embed"}
    assert local.tiers["embed"].task == "embed" and local.tiers["embed"].endpoints == ("embeddings",)
    assert local.tiers["coder"].tool_call_parser == "hermes"  # the tiny models write hermes tool calls
    assert all(t.model.tiny_seed is not None and t.resources.gpus == 0 for t in local.tiers.values())
    gpu = load_config(ROOT / "models.yaml", "gpu")
    assert all(t.model.repo and t.resources.gpus > 0 for t in gpu.tiers.values())


def test_profile_overlays_catalog_instead_of_copying(catalog: dict[str, Any]) -> None:
    local = load_config(ROOT / "models.yaml", "local")
    # Not in the local overlay: inherited from the catalog.
    assert local.tiers["coder"].aliases == catalog["tiers"]["coder"]["aliases"]
    assert local.tiers["coder"].description == catalog["tiers"]["coder"]["description"]
    # In the overlay: replaced, and `model` replaced whole (no repo left behind next to tiny_seed).
    assert local.tiers["coder"].engine.dtype == "float32"
    assert local.tiers["coder"].model.repo is None


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("tiers", "coder", "engine", "max_model_len"), 0,
         "tiers.coder.engine.max_model_len: Input should be greater than 0"),
        (("tiers", "coder", "engine", "dtype"), "float8", "tiers.coder.engine.dtype: Input should be"),
        (("tiers", "fast", "engine", "gpu_memory_utilization"), 1.5, "tiers.fast.engine.gpu_memory_utilization"),
        (("tiers", "fast", "engine", "quantization"), "magic", "tiers.fast.engine.quantization"),
        (("tiers", "fast", "resources", "cpus"), -1, "tiers.fast.resources.cpus: Input should be greater than 0"),
        (("tiers", "fast", "resources", "colocate_engine_core"), "sometimes",
         "tiers.fast.resources.colocate_engine_core: Input should be a valid boolean"),
        (("tiers", "reasoning", "replicas", "min"), 3, "tiers.reasoning.replicas: min (3) must be <= max (1)"),
        (("tiers", "reasoning", "replicas", "max"), "two",
         "tiers.reasoning.replicas.max: Input should be a valid integer"),
        (("tiers", "coder", "bogus"), 1, "tiers.coder.bogus: unknown field"),
        (("tiers", "coder", "model"), {"repo": "a/b", "path": "/x"}, "tiers.coder.model: set exactly one of"),
        (("tiers", "coder", "served_name"), "", "tiers.coder.served_name"),
    ],
)
def test_bad_values_name_their_yaml_path(catalog: dict[str, Any], path: tuple, value: Any, expected: str) -> None:
    data = copy.deepcopy(catalog)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = problems_for(data, None)
    assert any(p.startswith(expected) for p in problems), problems


def test_error_from_a_profile_points_into_the_profile(catalog: dict[str, Any]) -> None:
    data = copy.deepcopy(catalog)
    data["profiles"]["local"]["tiers"]["coder"]["engine"] = {"max_model_len": -5}
    problems = problems_for(data, "local")
    assert problems == ["profiles.local.tiers.coder.engine.max_model_len: Input should be greater than 0 (got -5)"]


def test_duplicate_names_and_reserved_names(catalog: dict[str, Any]) -> None:
    data = copy.deepcopy(catalog)
    data["tiers"]["fast"]["aliases"] = ["qwen2.5-coder"]
    assert any("'qwen2.5-coder' is already used by tier coder" in p for p in problems_for(data))
    data = copy.deepcopy(catalog)
    data["tiers"]["fast"]["aliases"] = ["auto"]
    assert any("'auto' is reserved" in p for p in problems_for(data))
    data = copy.deepcopy(catalog)
    data["tiers"]["Bad Name"] = data["tiers"].pop("fast")
    assert any(p.startswith("tiers.Bad Name") for p in problems_for(data))


def test_unknown_profile_and_missing_tiers(catalog: dict[str, Any]) -> None:
    known = "cluster, gpu, gpu-24gb, gpu-2x80gb, gpu-48gb, local"
    assert problems_for(catalog, "nope") == [f"profiles.nope: no such profile (known: {known})"]
    assert any(p.startswith("tiers:") for p in problems_for({"version": 1}))


def test_tensor_parallel_needs_gpus(catalog: dict[str, Any]) -> None:
    data = copy.deepcopy(catalog)
    data["tiers"]["reasoning"]["engine"]["tensor_parallel_size"] = 2
    assert any(p.startswith("tiers.reasoning: resources.gpus (0.45) must be >= engine.tensor_parallel_size (2)")
               for p in problems_for(data))


def test_deep_merge_replaces_lists_and_model() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "model": {"repo": "x"}}
    assert deep_merge(base, {"a": {"c": [3]}, "model": {"path": "/p"}}) == {
        "a": {"b": 1, "c": [3]}, "model": {"path": "/p"},
    }


def test_relative_model_path_resolves_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("tiers:\n  fast:\n    served_name: f\n    model: {path: weights/f}\n")
    config = load_config(tmp_path / "m.yaml")
    assert config.tiers["fast"].model.path == str(tmp_path / "weights" / "f")


def test_a_chat_template_resolves_against_the_file_and_must_exist(tmp_path: Path) -> None:
    yaml_text = ("tiers:\n  fast:\n    served_name: f\n    model: {tiny_seed: 1}\n"
                 "    tool_call_parser: hermes\n    chat_template: templates/NAME\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text("{{ messages }}")
    (tmp_path / "m.yaml").write_text(yaml_text.replace("NAME", "chat.jinja"))
    tier = load_config(tmp_path / "m.yaml").tiers["fast"]
    assert tier.chat_template == str(tmp_path / "templates" / "chat.jinja") and tier.tool_call_parser == "hermes"
    (tmp_path / "m.yaml").write_text(yaml_text.replace("NAME", "missing.jinja"))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "m.yaml")
    assert err.value.problems == [f"tiers.fast.chat_template: no such file: {tmp_path / 'templates' / 'missing.jinja'}"]


@pytest.mark.parametrize(("field", "value"), [("tool_call_parser", "her mes"), ("reasoning_parser", "a/b"),
                                              ("task", "chat")])
def test_agent_settings_are_checked_at_load(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"tiers": {"fast": {"served_name": "f", "model": {"tiny_seed": 1}, field: value}}}, None)
    assert err.value.problems[0].startswith(f"tiers.fast.{field}: ")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_validate_exit_codes(tmp_path: Path, catalog: dict[str, Any]) -> None:
    ok = run_cli("validate", str(ROOT / "models.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout

    bad = copy.deepcopy(catalog)
    bad["tiers"]["coder"]["engine"]["max_model_len"] = -1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = run_cli("validate", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert "tiers.coder.engine.max_model_len: Input should be greater than 0 (got -1)" in result.stderr

    (tmp_path / "broken.yaml").write_text("tiers: [unclosed\n")
    result = run_cli("validate", str(tmp_path / "broken.yaml"))
    assert result.returncode == 1 and "invalid YAML" in result.stderr

    result = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "cannot read" in result.stderr


def test_embedded_tier_must_exist_and_have_a_fixed_replica_count(catalog: dict[str, Any]) -> None:
    data = copy.deepcopy(catalog)
    data["ingress"]["embed_tier"] = "nope"
    assert problems_for(data) == ["(top level): ingress.embed_tier: unknown tier 'nope'"]
    data["ingress"]["embed_tier"] = "fast"
    data["tiers"]["fast"]["replicas"] = {"min": 0, "max": 2}
    (problem,) = problems_for(data)
    assert "ingress.embed_tier: tier 'fast' runs in the ingress replicas" in problem
    assert "min = max = ingress.replicas (1), not min 0, max 2" in problem
    data["tiers"]["fast"]["replicas"] = {"min": 1, "max": 1}
    assert build_config(data, None).ingress.embed_tier == "fast"


def test_the_local_profile_fits_a_two_core_machine() -> None:
    # Ray places a replica only where its CPUs are free: on a 2-core machine (the README's), one tier too many
    # leaves a replica (the ingress, say) pending for ever and the app never answers.
    local = load_config(ROOT / "models.yaml", "local")
    total = local.ingress.cpus + sum(tier.resources.cpus * tier.replicas.max for tier in local.tiers.values())
    assert total <= 2.0, total
