"""weft's conformance suite, run against the ``asyncio`` manager on both of its loops."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from weft_core.testing import ManagerTests


class TestAsyncio(ManagerTests):
    manager_name = "asyncio"


class TestUvloop(ManagerTests):
    manager_name = "asyncio"
    manager_options: ClassVar[dict[str, Any] | None] = {"loop": "uvloop"}

    @pytest.fixture(autouse=True)
    def _needs_uvloop(self) -> None:
        pytest.importorskip("uvloop")
