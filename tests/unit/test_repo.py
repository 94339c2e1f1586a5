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
