"""weft's conformance suite, run against the ``asyncio`` manager on both of its loops."""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import pytest

from weft_core.testing import ManagerTests


class TestAsyncio(ManagerTests):
    manager_name = "asyncio"


# A mark, not an autouse fixture: the suite's own autouse fixtures make the manager
# before a skipping fixture of the subclass would run (uvloop is an extra; without it
# this class erred, 101 tests, where it says it skips).
@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
class TestUvloop(ManagerTests):
    manager_name = "asyncio"
    manager_options: ClassVar[dict[str, Any] | None] = {"loop": "uvloop"}
