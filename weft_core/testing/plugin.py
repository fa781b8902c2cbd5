"""pytest plugin behind ``weft conformance NAME``: adds ``--weft-manager``.

Loaded only on request (``pytest -p weft_core.testing.plugin``); it defines no
fixtures, autouse or otherwise.
"""

from __future__ import annotations

import pytest

#: Seconds a conformance test may take before pytest-timeout (``weft-core[testing]``)
#: fails it, unless a timeout was configured: a manager that never returns from
#: ``stop_task`` would otherwise hang the run instead of failing the test.
DEFAULT_TIMEOUT = 120


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--weft-manager NAME``."""
    parser.getgroup("weft").addoption(
        "--weft-manager",
        dest="weft_manager",
        metavar="NAME",
        help="the installed weft task manager to run the conformance suite against",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Point the suite's test class at the manager named on the command line."""
    name = config.getoption("weft_manager")
    if name:
        from . import suite

        suite.TestConformance.manager_name = name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test :data:`DEFAULT_TIMEOUT` when pytest-timeout runs without a timeout set."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    if config.getoption("timeout", None) is not None or config.getini("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how to rerun what failed: the suite's test ids hold no file to paste back.

    The suite runs from the installed package (``--pyargs``), outside the directory
    pytest reports against, so a failure shows as ``::TestConformance::test_x``.
    """
    name = terminalreporter.config.getoption("weft_manager")
    failed = [
        report.nodeid.rsplit("::", 1)[-1].split("[", 1)[0]
        for key in ("failed", "error")
        for report in terminalreporter.stats.get(key, [])
        if getattr(report, "nodeid", "")
    ]
    if not name or not failed:
        return
    tests = " or ".join(dict.fromkeys(failed))  # each once, in the order they failed
    terminalreporter.write_line(f"to rerun what failed: weft conformance {name} -k '{tests}'")
