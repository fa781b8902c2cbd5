"""pytest plugin behind ``weft conformance NAME``: adds ``--weft-manager``.

Loaded only on request (``pytest -p weft_core.testing.plugin``); it defines no
fixtures, autouse or otherwise.
"""

from __future__ import annotations

import pytest


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
