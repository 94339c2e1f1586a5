"""The ingress object builds outside Ray, with or without a running event loop (keep-warm starts in either)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request

from serving.api.ingress import Ingress
from serving.config import deep_merge, load_config

ROOT = Path(__file__).resolve().parents[2]


def config_with_keep_warm(tmp_path: Path):
    import yaml

    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    data["profiles"]["local"] = deep_merge(
        data["profiles"]["local"],
        # No embedded tier: that would start an engine (the e2e suite covers it).
        {"ingress": {"embed_tier": None}, "tiers": {"fast": {"replicas": {"keep_warm_hours": "00:00-00:00"}}}},
    )
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data))
    return load_config(tmp_path / "m.yaml", "local")


def test_builds_without_a_loop_and_starts_keep_warm_later(tmp_path: Path) -> None:
    ingress = Ingress(config_with_keep_warm(tmp_path), {}, None, str(tmp_path))
    assert ingress.keep_warm_task is None and set(ingress.keep_warm) == {"fast"}
    # The local profile runs without keys (explicitly): an anonymous caller sees every name.
    assert ingress.models(Request({"type": "http", "headers": []}))["data"][-1]["id"] == "auto"


def test_builds_inside_a_loop_and_starts_keep_warm_at_once(tmp_path: Path) -> None:
    async def build() -> bool:
        ingress = Ingress(config_with_keep_warm(tmp_path), {}, None, str(tmp_path))
        started = ingress.keep_warm_task is not None and ingress.fleet.refreshing is not None
        ingress.keep_warm_task.cancel()
        ingress.fleet.refreshing.cancel()
        return started

    assert asyncio.run(build())
