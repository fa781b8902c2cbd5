"""Registers the ``threads`` manager with weft (entry point ``weft: threads``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl

from ._manager import ThreadManager


def _task_name() -> str:
    """The running task's name: its thread's."""
    return threading.current_thread().name


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``threads`` manager."""
    yield ManagerSpec(
        name="threads",
        factory=ThreadManager,  # ThreadManager(*, limit, stack_size, idle_threads=64, idle_expiry=10.0)
        description="a thread per connection (the default manager)",
        handler_kind="sync",
        preemptive_stop=False,  # a thread cannot be killed
        conformance=Conformance(task_name=_task_name),
    )
