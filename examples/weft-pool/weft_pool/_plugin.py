"""Registers the ``pool`` manager with weft (entry point ``weft: pool``).

weft loads this module through the ``weft`` entry-point group and calls its
``weft_managers`` hook; keep it light, since it is imported whenever weft looks
for managers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from weft_core import Conformance, ManagerSpec, hookimpl

from ._manager import PoolManager


def _task_name() -> str:
    """The running task's name: a worker thread takes the name of the task it runs."""
    return threading.current_thread().name


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``pool`` manager."""
    yield ManagerSpec(
        name="pool",
        factory=PoolManager,  # PoolManager(*, workers=16, limit=None)
        description="a fixed pool of worker threads fed by a queue",
        handler_kind="sync",
        preemptive_stop=False,  # a thread cannot be killed, only its socket shut down
        conformance=Conformance(task_name=_task_name),
    )
