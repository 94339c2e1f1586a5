"""The benchmark smoke test starts and stops its own servers (bare vLLM, `tierserve up`, a LiteLLM proxy).

It must run while no other app is up: the session fixture `app_url` (tests/conftest.py) refuses to start
while engine or Ray processes exist, and two apps on 2 cores would also starve each other. So tests marked
`bench` are moved to the front of the run, before any test asks for `app_url`; they leave no process
behind (the test asserts it). Run it alone with `python -m pytest tests/benchmarks`, or skip it with
`-m "not bench"`.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)  # after tests/conftest.py's ordering, so this one decides what runs first
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("bench") is None)
