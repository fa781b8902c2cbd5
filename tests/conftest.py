"""Guards for the whole test process."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test that monkey-patched this process: every later test would run patched."""
    result = yield
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        pytest.exit(f"{item.nodeid} monkey-patched the test process (gevent.monkey)", 3)
    return result


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the guards an outside check left (marked ``outside``) unless asked for them."""
    markexpr = config.getoption("markexpr") or ""
    if "outside" in markexpr and "not outside" not in markexpr:
        return
    skip = pytest.mark.skip(reason="opt-in: pytest -m outside (an outside check's guard)")
    for item in items:
        if item.get_closest_marker("outside") is not None:
            item.add_marker(skip)
