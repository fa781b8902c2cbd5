"""Provides the ``dummy`` manager: it only records the thunks it is given."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from weft_core import BLOCKING_RUNTIME, ManagerSpec, hookimpl


class DummyManager:
    """Holds tasks without running them; enough for the registry to create one."""

    runtime = BLOCKING_RUNTIME

    def __init__(self, *, limit: int | None = None) -> None:
        self.limit = limit
        self._ids = itertools.count()
        self._tasks: dict[Hashable, Callable[[], Any]] = {}

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        task_id = next(self._ids)
        self._tasks[task_id] = thunk
        return task_id

    def remove_task(self, task_id: Hashable) -> bool:
        return self._tasks.pop(task_id, None) is not None

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        return self.remove_task(task_id)

    def all_tasks(self) -> list[Hashable]:
        return list(self._tasks)


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    yield ManagerSpec(name="dummy", factory=DummyManager, description="records tasks")
