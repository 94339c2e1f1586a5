"""How the Ray Serve application is put together from the config (no Ray cluster needed to build it)."""

from __future__ import annotations

from pathlib import Path

from serving.app import build, ingress_options
from serving.config import build_config

TINY = {"tiny_seed": 1}
TIERS = {
    "fast": {"served_name": "f", "model": TINY, "resources": {"cpus": 0.5, "gpus": 0.25, "custom": {"node_a": 1}}},
    "coder": {"served_name": "c", "model": TINY},
}


def test_an_embedded_tier_has_no_deployment_and_its_resources_go_to_the_ingress(tmp_path: Path) -> None:
    config = build_config({"ingress": {"cpus": 0.25, "embed_tier": "fast"}, "tiers": TIERS}, None)
    options = ingress_options(config)
    actor = options["ray_actor_options"]
    assert actor == {"num_cpus": 0.75, "num_gpus": 0.25, "resources": {"node_a": 1}}
    assert options["health_check_timeout_s"] == 60  # the engine's allowance, not the default 30 s

    app = build(config, tmp_path, tmp_path)
    ingress_args = app._bound_deployment.init_args
    assert set(ingress_args[1]) == {"coder"}  # handles: only the tier that is a deployment of its own
    assert ingress_args[5] == str(tmp_path)  # the cache dir the embedded engine loads its model from


def test_without_embedding_every_tier_is_a_deployment(tmp_path: Path) -> None:
    config = build_config({"tiers": TIERS}, None)
    assert ingress_options(config)["ray_actor_options"] == {"num_cpus": 0.25}
    app = build(config, tmp_path, tmp_path)
    assert set(app._bound_deployment.init_args[1]) == {"coder", "fast"}


def test_the_gateway_replicas_ask_for_the_ingress_custom_resources(tmp_path: Path) -> None:
    head = {"node:__internal_head__": 0.01}
    providers = [{"name": "peer", "kind": "vllm", "base_url": "http://127.0.0.1:9/v1", "models": {"fast": "f"}}]
    config = build_config({"ingress": {"custom": head}, "tiers": TIERS, "providers": providers}, None)
    assert ingress_options(config)["ray_actor_options"] == {"num_cpus": 0.25, "resources": head}
    app = build(config, tmp_path, tmp_path)
    fallback = app._bound_deployment.init_args[2]
    assert fallback._bound_deployment.ray_actor_options["resources"] == head
    # Embedded: the tier's own resources and the gateway's together.
    embedded = build_config({"ingress": {"custom": head, "embed_tier": "fast"}, "tiers": TIERS}, None)
    assert ingress_options(embedded)["ray_actor_options"]["resources"] == {"node_a": 1, **head}
