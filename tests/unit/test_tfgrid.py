"""deployments/tfgrid against the providers' schemas, as read from their source (no tofu binary here).

tests/fixtures/tfgrid/provider_schema.json holds the resource, attribute and block names of threefoldtech/grid
and hashicorp/random at the commits it names (regenerate it with extract_provider_schema.py beside it). Every .tf
file is parsed with python-hcl2 and checked: resources and their arguments and nested blocks exist, required ones
are set, computed-only attributes are not, every reference (var., local., resource attributes) resolves, and the
outputs are the ones `tierserve inventory --from-tofu` reads. `tofu fmt/validate/plan` run on the operator's
machine (README.tfgrid.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from serving.ops.inventory import VM_FIELDS

REPO = Path(__file__).resolve().parents[2]
TFGRID = REPO / "deployments" / "tfgrid"
SCHEMA = json.loads((REPO / "tests" / "fixtures" / "tfgrid" / "provider_schema.json").read_text())
TOFU_OUTPUT = json.loads((REPO / "tests" / "fixtures" / "tfgrid" / "tofu_output.json").read_text())
PROVIDERS = SCHEMA["providers"]
GRID = PROVIDERS["grid"]
# Arguments and blocks every resource takes from the language itself.
META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
META_BLOCKS = {"lifecycle", "provisioner", "connection"}


def unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def parsed() -> dict[str, list[Any]]:
    """Every top-level block of every .tf file, merged by kind (resource, variable, output, ...)."""
    files = sorted(TFGRID.glob("*.tf"))
    assert files, TFGRID
    out: dict[str, list[Any]] = {}
    for path in files:
        for kind, items in hcl2.loads(path.read_text()).items():
            if not kind.startswith("__"):
                out.setdefault(kind, []).extend(items)
    return out


DOC = parsed()


def labelled(kind: str) -> dict[str, dict[str, Any]]:
    """{name: body} of the blocks of one kind with a single label (variable, output)."""
    return {unquote(name): body for item in DOC.get(kind, []) for name, body in item.items()}


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for item in DOC.get("resource", []):
        for rtype, named in item.items():
            for name, body in named.items():
                out[(unquote(rtype), unquote(name))] = body
    return out


def locals_() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in DOC.get("locals", []):
        out.update({k: v for k, v in block.items() if not k.startswith("__")})
    return out


def is_block(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get("__is_block__") for v in value)


def provider_of(rtype: str) -> dict[str, Any]:
    return PROVIDERS[rtype.split("_", 1)[0]]


def interpolations(value: Any) -> list[str]:
    """The expressions inside every `${...}` of a parsed value (hcl2 writes expressions that way)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if not key.startswith("__"):
                found += interpolations(key) + interpolations(item)
    elif isinstance(value, list):
        for item in value:
            found += interpolations(item)
    elif isinstance(value, str):
        i = 0
        while (start := value.find("${", i)) >= 0:
            depth, j = 0, start + 1
            while j < len(value):
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                if depth == 0:
                    break
                j += 1
            found.append(value[start + 2 : j])
            i = j
    return found


def check_body(body: dict[str, Any], schema: dict[str, Any], where: str, top: bool) -> list[str]:
    """Problems of one resource (or nested block) body against its schema."""
    problems = []
    present = set()
    for key, value in body.items():
        if key.startswith("__"):
            continue
        if key == "dynamic":
            for item in value:
                for label, spec in item.items():
                    name = unquote(label)
                    present.add(name)
                    if name not in schema["blocks"]:
                        problems.append(f"{where}: no block {name!r} (dynamic)")
                        continue
                    for content in spec["content"]:
                        problems += check_body(content, schema["blocks"][name], f"{where}.{name}", False)
            continue
        if top and (key in META_ARGUMENTS or key in META_BLOCKS):
            continue
        present.add(key)
        if is_block(value):
            if key not in schema["blocks"]:
                problems.append(f"{where}: no block {key!r}")
                continue
            block = schema["blocks"][key]
            if block.get("max_items") is not None and len(value) > block["max_items"]:
                problems.append(f"{where}.{key}: at most {block['max_items']}")
            for item in value:
                problems += check_body(item, block, f"{where}.{key}", False)
        elif key not in schema["attributes"]:
            problems.append(f"{where}: no argument {key!r}")
        else:
            attr = schema["attributes"][key]
            if attr.get("computed") and not (attr.get("optional") or attr.get("required")):
                problems.append(f"{where}.{key}: computed only, cannot be set")
    for name, attr in schema["attributes"].items():
        if attr.get("required") and name not in present:
            problems.append(f"{where}: required argument {name!r} missing")
    for name, block in schema["blocks"].items():
        if (block.get("required") or block.get("min_items")) and name not in present:
            problems.append(f"{where}: required block {name!r} missing")
    return problems


# -- the fixture ----------------------------------------------------------------------------------------------


def test_fixture_names_its_sources_and_has_the_resources() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", GRID["commit"]) and GRID["source"] == "threefoldtech/grid"
    assert re.fullmatch(r"[0-9a-f]{40}", PROVIDERS["random"]["commit"])
    assert {"grid_network", "grid_deployment", "grid_scheduler"} <= set(GRID["resources"])
    vms = GRID["resources"]["grid_deployment"]["blocks"]["vms"]
    wanted = {"gpus", "mycelium_ip_seed", "mycelium_ip", "zlogs", "env_vars", "computedip", "ip"}
    assert wanted <= set(vms["attributes"])
    assert set(vms["blocks"]) == {"mounts"}
    assert GRID["resources"]["grid_network"]["attributes"]["mycelium_keys"]["type"] == "map"
    assert GRID["resources"]["grid_scheduler"]["blocks"]["requests"]["required"]


# -- resources, arguments, blocks -----------------------------------------------------------------------------


def test_every_resource_argument_and_block_is_in_the_schema() -> None:
    found = resources()
    assert {t for t, _ in found} == {"grid_scheduler", "grid_network", "grid_deployment", "random_bytes"}
    problems = []
    for (rtype, name), body in found.items():
        schema = provider_of(rtype)["resources"].get(rtype)
        if schema is None:
            problems.append(f"{rtype}: not a resource of {provider_of(rtype)['source']}")
            continue
        problems += check_body(body, schema, f"{rtype}.{name}", True)
    assert problems == []


def test_the_checker_catches_mistakes() -> None:
    schema = GRID["resources"]["grid_deployment"]
    body = {"name": '"x"', "vms": [{"name": '"vm"', "flist": '"f"', "mycelium_ip": '"1"', "gpu": "[]",
                                    "mounts": [{"disk_name": '"d"', "__is_block__": True}], "__is_block__": True}]}
    problems = check_body(body, schema, "d", True)
    assert "d: required argument 'node' missing" in problems
    assert "d.vms.mycelium_ip: computed only, cannot be set" in problems
    assert "d.vms: no argument 'gpu'" in problems
    assert "d.vms.mounts: no argument 'disk_name'" in problems  # v1.11.1's name
    assert "d.vms.mounts: required argument 'name' missing" in problems


def test_provider_block_and_required_providers() -> None:
    (terraform,) = DOC["terraform"]
    (required,) = terraform["required_providers"]
    for local_name in ("grid", "random"):
        spec = required[local_name]
        assert unquote(spec["source"]) == PROVIDERS[local_name]["source"]
        assert unquote(spec.get("version", "")), f"{local_name}: pin a version"
    (provider,) = DOC["provider"]
    body = provider['"grid"']
    schema = GRID["provider"]["attributes"]
    assert set(body) - {"__is_block__"} <= set(schema)
    for name, attr in schema.items():
        # mnemonic comes from MNEMONIC: a required provider argument may be left to its environment variable.
        assert not attr.get("required") or name in body or attr.get("env_default"), name
    assert "mnemonic" not in body, "the mnemonic belongs in the environment, not in the configuration"


def test_names_follow_the_grid_pattern_and_mounts_name_disks() -> None:
    pattern = re.compile(GRID["resources"]["grid_network"]["attributes"]["name"]["validation"]["pattern"])

    def template(value: str) -> str:
        # Each interpolation stands for a name made of letters, digits and _ (checked in variables.tf).
        return re.sub(r"\$\{[^}]*\}", "x1", unquote(value))

    for (rtype, name), body in resources().items():
        if rtype in ("grid_network", "grid_deployment"):
            assert pattern.match(template(body["name"])), (rtype, name, body["name"])
        if rtype != "grid_deployment":
            continue
        disks = [template(d["name"]) for d in body.get("disks", [])]
        vms = list(body.get("vms", []))
        for item in body.get("dynamic", []):
            for label, spec in item.items():
                content = spec["content"]
                if unquote(label) == "disks":
                    disks += [template(c["name"]) for c in content]
                elif unquote(label) == "vms":
                    vms += content
        assert vms, name
        for vm in vms:
            mounts = vm.get("mounts", [])
            assert pattern.match(template(vm["name"])), vm["name"]
            # A full VM boots from its first disk: it is mounted at /.
            assert mounts and unquote(mounts[0]["mount_point"]) == "/", name
            for mount in mounts:
                assert template(mount["name"]) in disks, (name, mount["name"], disks)
            assert "ubuntu-24.04-full" in json.dumps(vm["flist"]) + json.dumps(locals_().get("flist", ""))
            assert "mycelium_ip_seed" in vm and "SSH_KEY" in vm["env_vars"], name


# -- references ---------------------------------------------------------------------------------------------


def references(pattern: str) -> set[str]:
    return {m for expr in interpolations(DOC) for m in re.findall(pattern, expr)}


def test_every_var_and_local_reference_resolves_and_nothing_is_unused() -> None:
    variables, local_values = set(labelled("variable")), set(locals_())
    used_vars = references(r"(?<![\w.])var\.(\w+)")
    used_locals = references(r"(?<![\w.])local\.(\w+)")
    assert used_vars - variables == set(), "undeclared variables"
    assert used_locals - local_values == set(), "undeclared locals"
    assert variables - used_vars == set(), "variables nothing reads"
    assert local_values - used_locals == set(), "locals nothing reads"


def test_every_resource_reference_names_a_declared_resource_and_a_schema_attribute() -> None:
    declared = resources()
    ref = re.compile(r"(?<![\w.])((?:grid|random)_\w+)\.(\w+)((?:\[[^\]]*\]|\.\w+)*)")
    checked = 0
    for expr in interpolations(DOC):
        for rtype, name, path in ref.findall(expr):
            assert (rtype, name) in declared, f"{rtype}.{name} is not declared: {expr}"
            node = provider_of(rtype)["resources"][rtype]
            body = declared[(rtype, name)]
            steps = re.findall(r"\.(\w+)|\[([^\]]*)\]", path)
            if steps and steps[0][1] and not ("count" in body or "for_each" in body):
                pytest.fail(f"{rtype}.{name} is indexed but has neither count nor for_each: {expr}")
            for attr, _index in steps:
                if not attr:
                    continue
                if attr in node["blocks"]:
                    node = node["blocks"][attr]
                    continue
                assert attr in node["attributes"], f"{rtype}.{name}{path}: no attribute {attr!r}"
                checked += 1
                break  # past an attribute come map keys and list items
    assert checked >= 15


def test_variables_are_typed_described_and_validated() -> None:
    for name, body in labelled("variable").items():
        assert "type" in body and unquote(body.get("description", "")), name
        if body["type"] == "bool":
            continue
        assert body.get("validation"), f"{name}: no validation block"
        for rule in body["validation"]:
            assert f"var.{name}" in rule["condition"], f"{name}: its validation must test it"
            # A sentence, as older Terraform/OpenTofu releases insist: capital first, full stop last.
            message = unquote(rule["error_message"])
            assert message[0].isupper() and message.endswith("."), name
    # The GPU id check is the provider's own pattern.
    gpu_pattern = GRID["resources"]["grid_deployment"]["blocks"]["vms"]["attributes"]["gpus"]["validation"]["pattern"]
    assert gpu_pattern in labelled("variable")["gpu_ids"]["validation"][0]["condition"]


def test_defaults_are_inside_the_providers_bounds() -> None:
    """Where an argument is set straight from a variable, the variable's default passes the provider's IntBetween."""
    variables = labelled("variable")
    checked = 0

    def walk(body: dict[str, Any], schema: dict[str, Any]) -> None:
        nonlocal checked
        for key, value in body.items():
            if key == "dynamic":
                for item in value:
                    for label, spec in item.items():
                        for content in spec["content"]:
                            walk(content, schema["blocks"][unquote(label)])
            elif is_block(value) and key in schema["blocks"]:
                for item in value:
                    walk(item, schema["blocks"][key])
            elif isinstance(value, str) and (m := re.fullmatch(r"\$\{var\.(\w+)\}", value)):
                bounds = schema["attributes"].get(key, {}).get("validation", {}).get("int_between")
                default = variables[m.group(1)].get("default")
                if bounds and default is not None:
                    assert bounds[0] <= default <= bounds[1], (key, m.group(1), default, bounds)
                    checked += 1

    for (rtype, _), body in resources().items():
        walk(body, provider_of(rtype)["resources"][rtype])
    assert checked >= 4  # cpu and memory of both kinds of VM
    disk_size = GRID["resources"]["grid_deployment"]["blocks"]["disks"]["attributes"]["size"]
    low, high = disk_size["validation"]["int_between"]
    assert all(low <= size <= high for size in locals_()["profile_disk_gb"].values())


# -- outputs ------------------------------------------------------------------------------------------------


def test_outputs_are_what_the_inventory_reads_and_match_the_fixture() -> None:
    outputs = labelled("output")
    assert set(outputs) == {"tierserve_profile", "ssh_user", "gpu_vm", "agent_vms", "network",
                            "wireguard_access_config"}  # fmt: skip
    assert set(TOFU_OUTPUT) == set(outputs)
    for name, body in outputs.items():
        assert TOFU_OUTPUT[name]["sensitive"] == bool(body.get("sensitive", False)), name
    gpu_fields = set(outputs["gpu_vm"]["value"])
    agent_fields = set(re.findall(r"(\w+) = ", interpolations(outputs["agent_vms"]["value"])[0].split("=>", 1)[1]))
    assert set(VM_FIELDS) <= gpu_fields and set(VM_FIELDS) <= agent_fields
    assert gpu_fields == set(TOFU_OUTPUT["gpu_vm"]["value"])
    for vm in TOFU_OUTPUT["agent_vms"]["value"].values():
        assert agent_fields == set(vm)
    # The VM names the inventory derives WireGuard addresses from.
    assert unquote(locals_()["gpu_vm_name"]) == TOFU_OUTPUT["gpu_vm"]["value"]["name"] == "gpu1"
    assert '"agent${i + 1}"' in locals_()["agent_names"]
