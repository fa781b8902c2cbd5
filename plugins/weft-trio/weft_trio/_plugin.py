"""Registers the ``trio`` manager with weft (entry point ``weft: trio``).

weft imports this module whenever it looks for managers (a gevent server, ``weft
ctl``): it imports trio only when a manager is made or a task's name is read.
"""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, TaskManager, hookimpl


def _create(*, limit: int | None = None) -> TaskManager:
    """``TrioManager(limit=...)``; its options named, so a misspelt one is named back."""
    from ._manager import TrioManager

    return TrioManager(limit=limit)


def _task_name() -> str:
    """The running task's name: the trio task's."""
    import trio

    return trio.lowlevel.current_task().name


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``trio`` manager."""
    yield ManagerSpec(
        name="trio",
        factory=_create,
        description="a task per connection in a trio nursery",
        handler_kind="async",
        conformance=Conformance(task_name=_task_name),
    )
