"""Helpers of the Ansible tests: the real tools, found or the test fails (never skipped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ansible_lab as lab
import pytest

import serving

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


def lab_workdir(prefix: str) -> Path:
    """A new directory for one real run, once what it needs is here (root, the tools): it fails, never skips."""
    if os.geteuid() != 0:
        pytest.fail("the real Ansible run needs root (network namespaces, systemd-nspawn)", pytrace=False)
    for name in ("ip", "systemd-nspawn", "debootstrap", "ssh", "ssh-keygen"):
        tool(name)
    root = lab.CACHE / "runs"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def venv_binds() -> list[Path]:
    """What a serving container sees read-only: the venv running these tests, the editable checkout it points
    at, and the interpreter the venv was made from (unless that is the system's /usr, which the image has too);
    nested paths come with their parent."""
    base = Path(sys.base_prefix)
    binds = sorted({Path(sys.prefix), Path(serving.__file__).resolve().parents[1]}
                   | ({base} if Path("/usr") not in [base, *base.parents] else set()))
    return [b for b in binds if not any(o in b.parents for o in binds)]
