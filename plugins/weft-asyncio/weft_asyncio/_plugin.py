"""Registers the ``asyncio`` manager with weft (entry point ``weft: asyncio``).

weft imports this module whenever it looks for managers, so it imports asyncio only
when a manager is made or a task's name is read.
"""

from __future__ import annotations

from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, TaskManager, hookimpl


def _create(*, limit: int | None = None, loop: str = "asyncio") -> TaskManager:
    """``AsyncioManager(limit=..., loop=...)``; named, so a misspelt option is named back."""
    from ._manager import AsyncioManager

    return AsyncioManager(limit=limit, loop=loop)


def _task_name() -> str:
    """The running task's name: the asyncio task's."""
    import asyncio

    task = asyncio.current_task()
    return task.get_name() if task is not None else ""


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``asyncio`` manager."""
    yield ManagerSpec(
        name="asyncio",
        factory=_create,
        description="a task per connection on an asyncio loop (option loop=uvloop)",
        handler_kind="async",
        conformance=Conformance(task_name=_task_name),
    )
