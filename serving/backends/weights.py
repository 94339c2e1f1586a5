"""Turn a tier's model source into a local directory vLLM can load: generate, check, or download."""

from __future__ import annotations

import logging
from pathlib import Path

from serving.config import AppConfig, ModelSource

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    pass


def resolve(source: ModelSource, cache_dir: Path, *, embedding: bool = False) -> Path:
    """The model directory of a tier's source; `embedding` picks the tiny embedding model for a tiny seed."""
    if source.tiny_seed is not None:
        from serving.backends.tinymodel import cached_tiny_model

        return cached_tiny_model(cache_dir, source.tiny_seed, embedding=embedding)
    if source.path is not None:
        path = Path(source.path).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsError(f"model path {path} has no config.json (not a Hugging Face model directory)")
        return path
    return download(source.repo or "", source.revision)


def download(repo: str, revision: str) -> Path:
    """Fetch (or reuse from the Hugging Face cache) one revision of a hub repo; tqdm shows progress.

    HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are honoured by huggingface_hub itself. Only the files vLLM needs
    are fetched: weights as safetensors, configs, tokenizer files.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id=repo,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except LocalEntryNotFoundError as exc:
        raise WeightsError(f"{repo}@{revision}: not in the local cache and the hub is unreachable") from exc
    except HfHubHTTPError as exc:
        raise WeightsError(f"{repo}@{revision}: download failed: {exc}") from exc
    return Path(path)


def prefetch(config: AppConfig, cache_dir: Path) -> dict[str, Path]:
    """Resolve every tier's weights before Ray starts, so replicas start from a warm local copy."""
    paths = {}
    for name, tier in config.tiers.items():
        log.info("tier %s: preparing %s", name, tier.model.model_dump(exclude_none=True))
        paths[name] = resolve(tier.model, cache_dir, embedding=tier.task == "embed")
    return paths
