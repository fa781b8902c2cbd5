"""ThreadManager: Weft's threaded-task-manager, a daemon thread per task.

``stop_task`` follows DESIGN's phases for one task: flag (phase 2), then, once
``timeout`` runs out, interrupt (phase 3). A thread cannot be killed, so
interrupting runs the task's interrupt callbacks and waits at most
``INTERRUPT_GRACE`` (2 s, ``TaskState.interrupt_and_wait``); for a connection the
server has already shut the socket down, which wakes the thread from
``recv``/``send`` at once.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Hashable
from typing import Any

from weft_core import BLOCKING_RUNTIME, BlockingRuntime, TaskState, TaskTable, run_task

__all__ = ["ThreadManager"]


class ThreadManager:
    """A thread per task, with an optional ``limit`` on how many run at once.

    ``stack_size`` (bytes), when given, is the stack of each new thread; Python
    sets it process-wide through ``threading.stack_size`` for the moment the thread
    starts.
    """

    runtime: BlockingRuntime = BLOCKING_RUNTIME

    def __init__(self, *, limit: int | None = None, stack_size: int | None = None) -> None:
        self._table: TaskTable[TaskState] = TaskTable(limit, "threads manager")
        self._stack_size = stack_size
        self._stack_lock = threading.Lock()

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    def __repr__(self) -> str:
        return f"<ThreadManager limit={self.limit} tasks={len(self._table)}>"

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        """Start ``thunk`` in a new daemon thread named after it."""
        task_id = self._table.reserve()
        name = getattr(thunk, "__name__", "") or f"weft task {task_id}"
        state = TaskState(task_id, name)
        self._table.put(task_id, state)
        # The thread enters the add_task caller's context first thing: Context.run
        # as its target, not inside it, is one C-level frame less on every thread's
        # stack (and stack pages are most of what an idle thread costs).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run, args=(self._run, state, thunk), name=name, daemon=True
        )
        try:
            if self._stack_size is None:
                thread.start()
            else:
                with self._stack_lock:
                    previous = threading.stack_size(self._stack_size)
                    try:
                        thread.start()
                    finally:
                        threading.stack_size(previous)
        except BaseException:
            self._table.pop(task_id)
            raise
        return task_id

    def _run(self, state: TaskState, thunk: Callable[[], Any]) -> None:
        try:
            run_task(state, thunk)
        finally:
            self._table.pop(state.id)

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (it goes on running); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Flag the task (phase 2), wait up to ``timeout``, then interrupt it (phase 3).

        Returns True if it ended before it had to be interrupted. Bounded once
        ``timeout`` is given: after the interrupt it waits at most ``INTERRUPT_GRACE``
        (2 s), and a thread still running then is left to finish on its own (False).
        """
        state = self._table.get(task_id)
        if state is None:
            return True
        state.request_shutdown()
        if state.done.wait(timeout):
            # done is set as the thunk returns, a moment before the thread forgets the
            # task: once stop_task returns, the id is no longer in all_tasks().
            self._table.pop(task_id)
            return True
        if state.interrupt_and_wait():
            self._table.pop(task_id)
        return False

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks running (or starting) now."""
        return self._table.ids()
