"""Claims ``dummy`` (as weft-test-good does) and ``dup-only`` (which nobody else does)."""

from __future__ import annotations

from weft_core import ManagerSpec, hookimpl


def _factory(**options: object) -> object:
    return object()


@hookimpl
def weft_managers() -> list[ManagerSpec]:
    return [
        ManagerSpec(name="dummy", factory=_factory, description="a second 'dummy'"),
        ManagerSpec(name="dup-only", factory=_factory, description="not claimed elsewhere"),
    ]
