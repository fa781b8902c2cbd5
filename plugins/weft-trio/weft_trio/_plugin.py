"""Registers the ``trio`` manager with weft (entry point ``weft: trio``)."""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl

from ._manager import TrioManager


def _task_name() -> str:
    """The running task's name: the trio task's."""
    import trio

    return trio.lowlevel.current_task().name


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``trio`` manager."""
    yield ManagerSpec(
        name="trio",
        factory=TrioManager,
        description="a task per connection in a trio nursery",
        handler_kind="async",
        conformance=Conformance(task_name=_task_name),
    )
