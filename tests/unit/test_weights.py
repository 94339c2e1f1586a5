"""Weights resolution: the real huggingface_hub download code, against a local hub cache (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.backends.tinymodel import GENERATOR_VERSION
from serving.backends.weights import WeightsError, resolve
from serving.config import ModelSource

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str) -> Path:
    """The on-disk layout huggingface_hub itself writes: refs/<rev> -> commit, snapshots/<commit>/files."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (snap / "model.safetensors").write_bytes(b"weights")
    return snap


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_resolves_from_the_hub_cache(offline_hub: Path, tmp_path: Path) -> None:
    snap = fake_hub_cache(offline_hub, "acme/coder-7b")
    path = resolve(ModelSource(repo="acme/coder-7b", revision="main"), tmp_path)
    assert path == snap
    assert (path / "model.safetensors").read_bytes() == b"weights"


def test_missing_repo_is_a_clear_error(offline_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="acme/absent@main: not in the local cache"):
        resolve(ModelSource(repo="acme/absent"), tmp_path)


def test_local_path_must_be_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"has no config\.json"):
        resolve(ModelSource(path=str(tmp_path)), tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve(ModelSource(path=str(tmp_path)), tmp_path) == tmp_path


def test_tiny_model_is_generated_into_the_cache(tmp_path: Path) -> None:
    path = resolve(ModelSource(tiny_seed=4), tmp_path)
    assert path == tmp_path / "models" / f"tiny-v{GENERATOR_VERSION}-seed4"
    assert (path / "config.json").is_file()
