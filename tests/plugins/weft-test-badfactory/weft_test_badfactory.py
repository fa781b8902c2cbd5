"""Provides ``badfactory``, a manager whose factory always raises."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import ManagerSpec, hookimpl


def _factory(*, limit: int | None = None) -> object:
    raise RuntimeError("badfactory cannot find its event loop")


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    yield ManagerSpec(name="badfactory", factory=_factory, description="always fails")
