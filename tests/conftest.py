"""Guards for the whole test process."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Examples are timed by the wall clock, which a loaded machine (the other xdist
# worker, a test's subprocesses) stretches: a property test is about its inputs.
settings.register_profile("weft", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("weft")


@pytest.fixture(autouse=True, scope="session")
def _a_runtime_directory_of_its_own() -> Iterator[None]:
    """This test process's own ``$XDG_RUNTIME_DIR``, which its servers inherit.

    A server not given a control socket takes the default path under it (as root
    without one: ``/run/weft/ctl.sock``), and a second server of the user finds it
    taken and goes without. Test processes run side by side (pytest-xdist) would
    then share it, and whether a server has a control socket would depend on what
    another process's test ran at that moment. Short (``/tmp/weft-rt-...``): the
    socket's path must fit in 107 bytes.
    """
    path = tempfile.mkdtemp(prefix="weft-rt-")
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
        shutil.rmtree(path, ignore_errors=True)


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
