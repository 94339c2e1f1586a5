"""Build the Ray Serve application from models.yaml: one deployment per tier, one ingress in front.

`serve run deployments/local.yaml` imports `serving.app:build_app` with the file's `args`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application, Deployment

from serving.api.ingress import Ingress, api
from serving.backends.fallback import FallbackServer
from serving.backends.replica_router import router_config
from serving.backends.tier import TierServer
from serving.config import AppConfig, AuthSettings, Resources, Settings, Tier, deployment_name, load_config

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


class BuildArgs(BaseModel):
    """The `args:` block of a deployments/*.yaml application."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = None
    profile: str | None = None
    cache_dir: str | None = None


def find_config(path: str) -> Path:
    """A relative path is tried against the cwd, then the checkout (the builder may run anywhere)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


# Engines load weights and compile: give them time before Serve's health checks count, and to drain. Checked
# often: the controller learns of a dead replica at its next check, and until then a request it holds for that
# replica has no failure to report (the ingress ejects the tier once the controller counts no running replica).
ENGINE_REPLICA_OPTIONS: dict[str, Any] = {
    "health_check_period_s": 2, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 30,
}


def engine_actor_options(res: Resources, cpus: float = 0.0) -> dict[str, Any]:
    """Ray actor options of a replica that holds a tier's engine (`cpus`: the replica's own on top)."""
    options: dict[str, Any] = {"num_cpus": cpus + res.cpus, "num_gpus": res.gpus}
    if res.custom:
        options["resources"] = dict(res.custom)
    return options


def deployment(cls: type) -> Deployment:
    """`serve.deployment` of a class (its typing picks the decorator-factory overload for a bare class)."""
    made: Deployment = serve.deployment(cls)  # type: ignore[assignment]
    return made


def tier_deployment(name: str, tier: Tier, cache_dir: Path) -> Application:
    res = tier.resources
    actor_options = engine_actor_options(res)
    if res.env:
        actor_options["runtime_env"] = {"env_vars": dict(res.env)}
    options: dict[str, Any] = {
        "name": deployment_name(name),
        "ray_actor_options": actor_options,
        "max_ongoing_requests": tier.replicas.max_ongoing_requests,
        **ENGINE_REPLICA_OPTIONS,
    }
    # Always our router: telemetry reads every replica through it, whichever policy requests follow.
    options["request_router_config"] = router_config(tier.replicas.max_imbalance,
                                                     sessions=tier.replicas.routing == "session")
    autoscaling = tier.replicas.autoscaling_config()
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = tier.replicas.min
    return deployment(TierServer).options(**options).bind(name, tier, str(cache_dir))


def build(config: AppConfig, cache_dir: Path, state_dir: Path) -> Application:
    embedded = config.ingress.embed_tier
    tiers = {name: tier_deployment(name, tier, cache_dir) for name, tier in config.tiers.items() if name != embedded}
    fallback = None
    if config.providers:
        # One replica: breakers and budgets are this process's state (budgets persisted in SQLite).
        fallback = deployment(FallbackServer).options(
            name="fallback", num_replicas=1, max_ongoing_requests=config.ingress.max_ongoing_requests,
            ray_actor_options=gateway_actor_options(config, 0),
        ).bind(config, str(state_dir))
    ingress = deployment(serve.ingress(api)(Ingress)).options(**ingress_options(config))
    return ingress.bind(config, tiers, fallback, str(state_dir), AuthSettings(), str(cache_dir))


def ingress_options(config: AppConfig) -> dict[str, Any]:
    """The ingress deployment; with an embedded tier it also holds that tier's resources and engine."""
    options: dict[str, Any] = {
        "name": "ingress",
        "num_replicas": config.ingress.replicas,
        "max_ongoing_requests": config.ingress.max_ongoing_requests,
        "ray_actor_options": gateway_actor_options(config, config.ingress.cpus),
    }
    if config.ingress.embed_tier is not None:
        res = config.tiers[config.ingress.embed_tier].resources
        actor = engine_actor_options(res, config.ingress.cpus)
        if config.ingress.custom:
            actor["resources"] = {**actor.get("resources", {}), **config.ingress.custom}
        options["ray_actor_options"] = actor
        options.update(ENGINE_REPLICA_OPTIONS)  # its health check asks the engine, as a tier replica's does
    return options


def gateway_actor_options(config: AppConfig, cpus: float) -> dict[str, Any]:
    """Ray actor options of the ingress and fallback replicas: their CPUs and `ingress.custom`."""
    options: dict[str, Any] = {"num_cpus": cpus}
    if config.ingress.custom:
        options["resources"] = dict(config.ingress.custom)
    return options


def build_app(args: dict[str, Any]) -> Application:
    parsed = BuildArgs.model_validate(args or {})
    settings = Settings()
    path = find_config(parsed.config or str(settings.config))
    config = load_config(path, parsed.profile or settings.profile)
    cache_dir = Path(parsed.cache_dir).expanduser() if parsed.cache_dir else settings.cache_dir
    log.info("tierserve: profile %s from %s, tiers %s", config.profile, path, ", ".join(config.tiers))
    return build(config, cache_dir, settings.state_dir)
