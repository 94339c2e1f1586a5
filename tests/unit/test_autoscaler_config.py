"""deployments/autoscaler/aws.yaml against Ray's cluster-config schema and models.yaml's `cluster` profile.

Offline: Ray's own `prepare_config` + `validate_config` (what its tests run on its example configs; `ray up`
adds the AWS calls), then the profile's tiers against the node types: the autoscaler launches a node for a
pending replica only if some node type's `resources` cover the replica's demand.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from serving.config import AppConfig, Tier, load_config

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "deployments" / "autoscaler" / "aws.yaml"


def raw_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(AWS.read_text())
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """aws.yaml as the launcher and the autoscaler read it: merged with Ray's AWS defaults, min/max filled."""
    return prepare_config(raw_config())


@pytest.fixture(scope="module")
def profile() -> AppConfig:
    return load_config(REPO / "models.yaml", "cluster")


def workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types: dict[str, dict[str, Any]] = config["available_node_types"]
    return {name: t for name, t in types.items() if name != config["head_node_type"]}


def offers(node_type: dict[str, Any], tier: Tier) -> bool:
    """The node type satisfies one replica's demand: its custom resources, GPUs and CPUs."""
    res: dict[str, float] = node_type["resources"]
    return (all(res.get(key, 0) >= amount for key, amount in tier.resources.custom.items())
            and res.get("GPU", 0) >= tier.resources.gpus and res.get("CPU", 0) >= tier.resources.cpus)


def replicas_per_node(node_type: dict[str, Any], tier: Tier) -> int:
    res: dict[str, float] = node_type["resources"]
    fits = [math.floor(res.get("CPU", 0) / tier.resources.cpus)]
    if tier.resources.gpus > 0:
        fits.append(math.floor(res.get("GPU", 0) / tier.resources.gpus))
    return min(fits)


def node_type_of(config: dict[str, Any], name: str, tier: Tier) -> dict[str, Any]:
    matches = [t for t in workers(config).values() if offers(t, tier)]
    assert len(matches) == 1, f"tier {name}: {len(matches)} node types offer {tier.resources}"
    return matches[0]


def ray_start(commands: list[str]) -> list[str]:
    """The arguments of the `ray start` command in the list (after `ray start`)."""
    for command in commands:
        words = shlex.split(command.split(";")[-1])
        for i, word in enumerate(words[:-1]):
            if word.endswith("/ray") or word == "ray":
                if words[i + 1] == "start":
                    return words[i + 2:]
    raise AssertionError(f"no `ray start` in {commands}")


def option(args: list[str], name: str) -> str | None:
    """--name=value or --name value."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def test_rays_schema_accepts_it_and_rejects_a_broken_copy(config: dict[str, Any]) -> None:
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # The schema is really applied: a fractional resource (Ray wants integers) fails it.
    broken = copy.deepcopy(config)
    next(iter(workers(broken).values()))["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_every_tier_has_the_one_node_type_that_offers_its_resources(
        config: dict[str, Any], profile: AppConfig) -> None:
    assert profile.ingress.embed_tier is None  # an embedded tier would put an engine in the ingress replica
    served: set[int] = set()
    for name, tier in profile.tiers.items():
        assert tier.resources.custom, f"tier {name} is pinned to no node type"
        node_type = node_type_of(config, name, tier)
        served.add(id(node_type))
        assert node_type["resources"]["GPU"] >= tier.engine.tensor_parallel_size  # TP's GPUs on one node
        per_node = replicas_per_node(node_type, tier)
        assert per_node >= 1
        assert node_type["max_workers"] >= math.ceil(tier.replicas.max / per_node), name
        # No GPU node kept that the tier's minimum does not use: a tier that scales to zero keeps none.
        assert node_type["min_workers"] <= math.ceil(tier.replicas.min / per_node), name
    assert len(served) == len(workers(config)) == len(profile.tiers)  # one node type per tier, none spare


def test_head_holds_the_ingress_and_no_engine(config: dict[str, Any], profile: AppConfig) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    tier_resources = {key for tier in profile.tiers.values() for key in tier.resources.custom}
    assert head["resources"].get("GPU", 0) == 0
    assert not tier_resources & set(head["resources"])
    assert head["max_workers"] == 0
    assert head["resources"]["CPU"] >= profile.ingress.cpus
    # A worker with CPU left over could take the ingress replica and would then never idle.
    for name, tier in profile.tiers.items():
        node_type = node_type_of(config, name, tier)
        spare = node_type["resources"]["CPU"] - replicas_per_node(node_type, tier) * tier.resources.cpus
        assert spare < profile.ingress.cpus, f"{name}'s node type has room for the ingress"


def test_idle_nodes_are_removed_and_the_global_bounds_hold(config: dict[str, Any]) -> None:
    assert isinstance(config["idle_timeout_minutes"], int) and config["idle_timeout_minutes"] > 0
    assert "idle_timeout_minutes" in raw_config()  # set here, not Ray's default
    types = workers(config).values()
    assert config["max_workers"] >= sum(t["max_workers"] for t in types)
    assert config["max_workers"] >= sum(t["min_workers"] for t in types)


def test_workers_join_the_head(config: dict[str, Any]) -> None:
    head = ray_start(config["head_start_ray_commands"])
    assert "--head" in head
    assert option(head, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    assert option(head, "--dashboard-host") == "127.0.0.1"
    port = option(head, "--port") or "6379"
    # One global worker start command: Ray's schema has no per-node-type start commands.
    worker = ray_start(config["worker_start_ray_commands"])
    assert "--head" not in worker
    assert option(worker, "--address") == f"$RAY_HEAD_IP:{port}"


def test_nodes_install_the_checkout_and_fetch_the_profiles_weights(config: dict[str, Any]) -> None:
    assert config["file_mounts"] == {"~/tierserve": "."}  # the checkout, synced from where `ray up` runs
    assert ".gitignore" in config["rsync_filter"]  # so the venv and any Tofu state stay behind
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()
    assert "*.tfstate" in (REPO / "deployments" / "tfgrid" / ".gitignore").read_text().splitlines()

    install = [c for c in config["setup_commands"] if re.search(r"pip install .*-e '\.\[gpu\]'", c)]
    assert len(install) == 1 and install[0].startswith("cd ~/tierserve && ")
    venv = re.search(r"(\S+)/bin/pip install", install[0])
    assert venv is not None
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert all(c.split()[0] == f"{venv[1]}/bin/ray" for c in commands if "ray stop" in c)
        assert f"{venv[1]}/bin/ray start" in commands[-1]
    assert any(f"{venv[1]}/bin/pip install" in c and "boto3" in c for c in config["head_setup_commands"])
    fetch = [c for c in config["worker_setup_commands"] if "tierserve fetch-models" in c]
    assert len(fetch) == 1 and "--profile cluster" in fetch[0]


def test_it_deploys_the_cluster_app_of_the_same_profile() -> None:
    assert "serve deploy deployments/cluster.yaml" in AWS.read_text()
    app = yaml.safe_load((REPO / "deployments" / "cluster.yaml").read_text())
    (application,) = app["applications"]
    assert application["args"]["profile"] == "cluster"
    assert app["proxy_location"] == "HeadOnly"  # the proxy on the head: the workers hold only engines


def test_the_cluster_tests_fake_provider_config_is_aws_yamls_fast_node_type_and_valid_for_ray() -> None:
    """tests/cluster/ runs the autoscaler on Ray's fake multi-node provider with this config: the head's monitor
    validates it without filling in defaults, so it must be complete as written."""
    from tests.support.raycluster import AUTOSCALED, fake_autoscaler_config

    fake = fake_autoscaler_config("127.0.0.1:6379", 0.25)
    validate_config(fake)
    aws = raw_config()["available_node_types"][AUTOSCALED]
    node_type = fake["available_node_types"][AUTOSCALED]
    assert node_type["resources"] == {k: v for k, v in aws["resources"].items() if k != "GPU"}
    assert (node_type["min_workers"], node_type["max_workers"]) == (aws["min_workers"], aws["max_workers"])
    # Ray's fake_multi_node/example.yaml settings: every node has one address, so nodes are known by id.
    assert fake["provider"] == {"type": "fake_multinode", "gcs_address": "127.0.0.1:6379", "use_node_id_as_ip": True,
                                "disable_node_updaters": True, "disable_launch_config_check": True}
