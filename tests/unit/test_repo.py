"""Repository contracts: README's two commands, .ci/run running exactly the test one, ruff clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines[:12] if line.startswith("    ")]


def test_readme_starts_with_the_two_commands() -> None:
    run, test = readme_commands()[:2]
    assert run.endswith("tierserve up") and "'.[cpu]'" in run
    assert test.endswith("python -m pytest") and "'.[cpu,test]'" in test
    assert "apt-get install" in test and "wireguard-go" in test  # the Ansible rehearsal's packages
    for command in (run, test):
        assert "pip uninstall -y torchvision torchaudio torchcodec" in command


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
    assert "set -euo pipefail" in ci  # a pytest exit of 5 (no tests) fails CI too


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "serving", "tests", "benchmarks"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_files_build_the_app_with_their_profile() -> None:
    import yaml

    from serving.config import load_config

    for name, profile in (("local", "local"), ("gpu-vm", "gpu"), ("cluster", "cluster")):
        doc = yaml.safe_load((ROOT / "deployments" / f"{name}.yaml").read_text())
        (app,) = doc["applications"]
        assert app["import_path"] == "serving.app:build_app"
        assert app["args"]["profile"] == profile
        assert doc["http_options"]["host"] == "127.0.0.1"  # never 0.0.0.0 by default
        load_config(ROOT / app["args"]["config"], profile)


def test_types_check() -> None:
    """mypy on serving/ and benchmarks/ (pyproject's [tool.mypy]), clean."""
    result = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# The request path's layers, top to bottom: a module imports only from its own layer or those below it, so a
# request flows one way (api -> gateway -> backends) and the shared vocabulary sits at the bottom.
LAYERS = {
    "serving.app": 6, "serving.cli": 6,
    "serving.api": 5,
    "serving.gateway": 4,
    "serving.backends": 3,
    "serving.security": 2, "serving.spend": 2, "serving.ops": 2,
    "serving.wire": 1,
    "serving.config": 0,
}


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module}: in no layer (add it to LAYERS)")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def serving_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / "serving").rglob("*.py")}


def test_imports_flow_one_way_down_the_layers() -> None:
    climbs = []
    for module, path in serving_modules().items():
        if module == "serving":
            continue
        for imported in imports_of(path):
            if imported.startswith("serving.") and layer_of(imported) > layer_of(module):
                climbs.append(f"{module} imports {imported}")
    assert not climbs, climbs


def test_config_imports_nothing_else_of_serving_and_the_gateway_no_engine() -> None:
    modules = serving_modules()
    assert not {m for m in imports_of(modules["serving.config"]) if m.startswith("serving")}
    for module, path in modules.items():
        if module.startswith("serving.gateway"):
            bad = {m for m in imports_of(path) if m.split(".")[0] == "vllm" or m.startswith("serving.backends")}
            assert not bad, f"{module} imports {bad}"
    # And at run time: importing the whole gateway loads no vLLM (its import alone costs seconds and torch).
    gateway = [m for m in modules if m.startswith("serving.gateway.")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in gateway) + "print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
