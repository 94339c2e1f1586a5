"""Figures a test measured (counts, timings), printed at once and again in the run's summary (tests/conftest.py's
pytest_terminal_summary), so a CI log shows them for passing tests too."""

from __future__ import annotations

MEASUREMENTS: list[str] = []


def measured(line: str) -> None:
    print("\n" + line)
    MEASUREMENTS.append(line)
