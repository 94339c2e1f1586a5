"""Helpers of the Ansible tests: the real tools, found or the test fails (never skipped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
INVENTORIES = sorted((ANSIBLE_DIR / "inventories").glob("*/hosts.yml"))


def tool(name: str) -> str:
    """Path of a command-line tool: beside the running interpreter (its venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; see tests/ansible/REQUIREMENTS.md", pytrace=False)
    return found


def ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def run_tool(*cmd: str, cwd: Path = ANSIBLE_DIR, timeout: float = 600, env: dict[str, str] | None = None):
    return subprocess.run(
        cmd, cwd=cwd, env=env or ansible_env(), text=True, capture_output=True, timeout=timeout, check=False
    )
