"""Runs a benchmark module as a user does (`python -m ...`) for the CI smoke tests, and checks it exited
cleanly and left no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def _our_processes(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_benchmark(module: str, *args: str) -> str:
    """`python -m module args...` from the repository root; its output. Fails the test on a non-zero exit, a
    run over TIMEOUT_S (stopped with SIGINT, the runner's clean path: it stops every server it started) or a
    process of its own left running."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
        pytest.fail(f"{module} took over {TIMEOUT_S}s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"{module} exited with {proc.returncode}:\n{output[-8000:]}"
    assert not _our_processes(proc.pid)
    return output


def result_document(out: Path, name: str, suffixes: tuple[str, ...] = (".json", ".md")) -> tuple[dict, Path]:
    """The one run's `*-smoke-<name>` result files in `out`, each written and not empty: (its JSON document, the
    files' stem). Every process stopped cleanly (no VLLM:: left) and the run reported no failure."""
    stems = sorted(p.stem for p in out.glob(f"*-smoke-{name}.json"))
    assert len(stems) == 1, sorted(p.name for p in out.iterdir())
    stem = out / stems[0]
    for suffix in suffixes:
        path = stem.with_suffix(suffix)
        assert path.is_file() and path.stat().st_size > 0, path
    doc: dict = json.loads(stem.with_suffix(".json").read_text())
    assert doc["meta"]["stop_problems"] == []
    assert doc["failures"] == [], doc["failures"]
    return doc, stem
