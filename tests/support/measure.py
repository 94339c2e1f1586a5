"""Figures a test measured (counts, timings), printed at once and again in the run's summary (tests/conftest.py's
pytest_terminal_summary), so a CI log shows them for passing tests too."""

from __future__ import annotations

from collections import defaultdict

MEASUREMENTS: list[str] = []


def measured(line: str) -> None:
    print("\n" + line)
    MEASUREMENTS.append(line)


def slowest(phases: list[tuple[str, float]], top: int = 20) -> list[str]:
    """Seconds per test file and the slowest tests (setup, call and teardown together), one short line each."""
    per_test: dict[str, float] = defaultdict(float)
    for nodeid, seconds in phases:
        per_test[nodeid] += seconds
    per_file: dict[str, float] = defaultdict(float)
    for nodeid, seconds in per_test.items():
        per_file[nodeid.split("::")[0]] += seconds
    files = sorted(per_file.items(), key=lambda kv: -kv[1])
    tests = sorted(per_test.items(), key=lambda kv: -kv[1])[:top]
    if not files:
        return []
    return ([f"total {sum(per_file.values()):.0f}s; by file: "
             + ", ".join(f"{name.removeprefix('tests/')} {s:.0f}" for name, s in files if s >= 5)]
            + [f"{s:7.1f}s {nodeid.removeprefix('tests/')}" for nodeid, s in tests if s >= 1])
