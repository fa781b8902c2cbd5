"""Registers the ``aio`` manager with weft (entry point ``weft: aio``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl

from ._manager import AioManager


def _task_name() -> str:
    """The running task's name: the asyncio task's."""
    task = asyncio.current_task()
    return task.get_name() if task is not None else ""


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``aio`` manager."""
    yield ManagerSpec(
        name="aio",
        factory=AioManager,
        description="a task per connection on an asyncio loop (a test plugin)",
        handler_kind="async",
        preemptive_stop=True,  # a task is cancelled
        conformance=Conformance(
            task_name=_task_name,
            # Handlers get an AioStream (read/write), which the suite's default
            # async adapter (receive_some/send_all) does not speak.
            adapter_class="weft_test_aio._suite:AioAdapter",
        ),
    )
