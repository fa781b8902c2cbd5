"""Registers the ``trio`` manager with weft (entry point ``weft: trio``)."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import ManagerSpec, hookimpl

from ._manager import TrioManager


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``trio`` manager."""
    yield ManagerSpec(
        name="trio",
        factory=TrioManager,
        description="a task per connection in a trio nursery",
        handler_kind="async",
    )
