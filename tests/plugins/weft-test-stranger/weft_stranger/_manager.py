"""FuturesManager: weft tasks on a concurrent.futures.ThreadPoolExecutor.

Written only from docs/writing-a-manager.md and weft_core's public names.
Broken variants (for the probe) are selected with the ``flaw=`` option.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Hashable
from typing import Any

from weft_core import BlockingRuntime, TaskState, TaskTable, run_task

FLAWS = {
    None,
    "stop-returns-early",  # stop_task returns True at once after flagging
    "never-forgets",  # tasks never leave all_tasks() once they end
    "stop-blocks",  # stop_task(id, timeout) waits for the task forever, ignoring timeout
    "stop-raises",  # stop_task raises RuntimeError
    "stop-wrong-type",  # stop_task returns None
    "never-interrupts",  # stop_task never calls interrupt(): flag, wait, give up
    "add-returns-none",  # add_task returns None as id
    "add-raises",  # add_task raises RuntimeError (not ManagerFullError)
    "close-blocks",  # runtime.close() blocks
    "no-flag",  # stop_task never sets the flag, only interrupts after timeout
    "interrupt-blocks",  # TaskState.interrupt() blocks for a long time
    "leaks-threads",  # runtime.close() never shuts the executor down
    "lies-true",  # stop_task returns True even when the task had to be interrupted
    "remove-noop",  # remove_task always False, never forgets
    "all-tasks-empty",  # all_tasks() always []
}


class FuturesRuntime(BlockingRuntime):
    """Blocking stdlib sockets; closing it shuts the executor down."""

    def __init__(self, manager: FuturesManager) -> None:
        self._manager = manager

    def close(self) -> None:
        if self._manager._flaw == "close-blocks":
            threading.Event().wait(30)
        if self._manager._flaw == "leaks-threads":
            return
        self._manager._shutdown_executor()


class _BlockingInterruptState(TaskState):
    __slots__ = ()

    def interrupt(self) -> bool:
        first = super().interrupt()
        threading.Event().wait(20)
        return first


class _Entry:
    __slots__ = ("future", "started", "state")

    def __init__(self, state: TaskState) -> None:
        self.state = state
        self.future: concurrent.futures.Future[None] | None = None
        self.started = False


class FuturesManager:
    """Each task is a job of a ThreadPoolExecutor of ``workers`` threads."""

    def __init__(
        self, *, workers: int = 64, limit: int | None = None, flaw: str | None = None
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"stranger manager: workers must be an integer, not {workers!r}")
        if workers < 2:
            raise ValueError(f"stranger manager: workers must be at least 2, not {workers}")
        if flaw not in FLAWS:
            raise ValueError(f"stranger manager: unknown flaw {flaw!r}")
        self._workers = workers
        self._flaw = flaw
        self._table: TaskTable[_Entry] = TaskTable(limit, "stranger manager")
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.runtime = FuturesRuntime(self)

    @property
    def limit(self) -> int | None:
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self._workers, thread_name_prefix="stranger"
                )
            return self._executor

    def _shutdown_executor(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=False)

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        if self._flaw == "add-raises":
            raise RuntimeError("stranger manager: no more tasks today")
        task_id = self._table.reserve()
        name = getattr(thunk, "__name__", "") or f"stranger task {task_id}"
        cls = _BlockingInterruptState if self._flaw == "interrupt-blocks" else TaskState
        entry = _Entry(cls(task_id, name))
        self._table.put(task_id, entry)
        context = contextvars.copy_context()
        try:
            entry.future = self._pool().submit(self._run, entry, thunk, context)
        except BaseException:
            self._table.pop(task_id)
            raise
        if self._flaw == "add-returns-none":
            return None  # type: ignore[return-value]
        return task_id

    def _run(self, entry: _Entry, thunk: Callable[[], Any], context: contextvars.Context) -> None:
        entry.started = True
        thread = threading.current_thread()
        old = thread.name
        thread.name = entry.state.name
        try:
            run_task(entry.state, thunk, context)
        finally:
            thread.name = old
            if self._flaw not in ("never-forgets", "remove-noop"):
                self._table.pop(entry.state.id)

    def remove_task(self, task_id: Hashable) -> bool:
        if self._flaw == "remove-noop":
            return False
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        flaw = self._flaw
        if flaw == "stop-raises":
            raise RuntimeError("stranger manager: stop_task is broken")
        entry = self._table.get(task_id)
        if entry is None:
            return True
        state = entry.state
        if flaw != "no-flag":
            state.request_shutdown()
        if flaw == "stop-returns-early":
            return True
        if flaw == "stop-wrong-type":
            return None  # type: ignore[return-value]
        if flaw == "stop-blocks":
            state.done.wait()
            return True
        if state.done.wait(timeout):
            if flaw not in ("never-forgets", "remove-noop"):
                self._table.pop(task_id)
            return True
        if flaw == "never-interrupts":
            return False
        future = entry.future
        if future is not None and future.cancel():
            self._table.pop(task_id)
            state.interrupt()
            state.set_done()
            return False
        ended = state.interrupt_and_wait()
        if ended and flaw not in ("never-forgets", "remove-noop"):
            self._table.pop(task_id)
        return flaw == "lies-true"

    def all_tasks(self) -> list[Hashable]:
        if self._flaw == "all-tasks-empty":
            return []
        return self._table.ids()
