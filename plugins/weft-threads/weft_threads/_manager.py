"""ThreadManager: weft's threaded task manager, a daemon thread per task, reused.

A thread per connection stays the model, but a thread whose task has ended waits
for the next one instead of exiting: starting an OS thread is most of what a short
connection costs on this manager (issue 17 measured churn at about socketserver's,
a new thread per connection). There is no queue in front of a free thread:
``add_task`` hands the task to the most recently idled thread if there is one, and
starts a new thread otherwise, so a task never waits for another to end.

The hand-off: each idle thread blocks on a ``threading.Lock`` of its own (acquired
with ``idle_expiry`` as its timeout); ``add_task`` pops the newest idle thread (LIFO:
its stack is warm in the cache, and the surplus at the bottom expires), gives it the
task and releases its lock. Which of "the wait timed out" and "add_task took it"
wins is decided under one lock, the one guarding the list of idle threads, so a
task handed over at the moment of expiry still runs.

Nothing of one task reaches the next on the same thread: each task runs in a copy
of its own ``add_task`` caller's context (contextvars), and the thread takes the
task's name. ``threading.local`` data set by a task does outlive it on a reused
thread, as in any thread pool; ``idle_threads=0`` turns reuse off.

``Server.submit`` calls take the same threads through the runtime's ``spawn_soon``,
but are no tasks of the manager: no id, not counted against ``limit`` (parked
subscribers filling the limit had locked out the very calls that wake them).

``stop_task`` follows DESIGN's phases for one task: flag (phase 2), then, once
``timeout`` runs out, interrupt (phase 3). A thread cannot be killed, so
interrupting runs the task's interrupt callbacks and waits at most
``INTERRUPT_GRACE`` (2 s, ``TaskState.interrupt_and_wait``); for a connection the
server has already shut the socket down, which wakes the thread from
``recv``/``send`` at once.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from weft_core import BlockingRuntime, TaskState, TaskTable, run_task

__all__ = [
    "DEFAULT_IDLE_EXPIRY",
    "DEFAULT_IDLE_THREADS",
    "IDLE_THREAD_NAME",
    "ThreadManager",
    "ThreadRuntime",
]

#: Idle threads kept for reuse. Enough for the churn weft's benchmark drives (50
#: clients connecting over and over) with room to spare, and cheap: an idle thread
#: holds the stack pages it touched, about 12 KiB RSS after an echo connection
#: (measured with 500 of them), so the whole cache costs under 1 MiB, and only for
#: ``idle_expiry``. A burst larger than this starts new threads as before; the
#: extra ones exit as they end.
DEFAULT_IDLE_THREADS = 64

#: Seconds an idle thread waits for a task before it exits. Long enough to bridge
#: the gaps between a client's reconnects and between bursts of short connections,
#: short enough that the threads of a past burst are soon given back (LIFO reuse
#: keeps the few that steady traffic needs warm and lets the rest run out).
DEFAULT_IDLE_EXPIRY = 10.0

#: What an idle thread is called, so that ``weft ctl stacks`` tells it from a task.
IDLE_THREAD_NAME = "weft threads: idle"

#: What a thread running a ``spawn_soon`` call (``Server.submit``) is called.
SUBMIT_THREAD_NAME = "weft submit"

#: How long ``close()`` waits, in all, for the idle threads it ended to exit. They
#: exit as soon as they wake; the wait only makes "closed" mean "gone" in practice,
#: and must never hold up a server's stop for long.
CLOSE_JOIN = 1.0

# A task as handed to a thread: its state, its thunk, the add_task caller's context;
# or, for a spawn_soon call, no state and no context (the thunk brings its own).
_Job = tuple[TaskState | None, Callable[[], Any], contextvars.Context | None]


log = logging.getLogger("weft.threads")

#: Every manager, so that a forked child can forget its parent's idle threads.
_MANAGERS: weakref.WeakSet[ThreadManager] = weakref.WeakSet()


def _forget_idle_threads_after_fork() -> None:
    # Only the forking thread survives a fork: a parent's idle thread handed a task in
    # the child would never run it, and the lock may have been held by another thread.
    for manager in list(_MANAGERS):
        manager._idle_lock = threading.RLock()
        manager._idle = []


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_idle_threads_after_fork)


class ThreadRuntime(BlockingRuntime):
    """Blocking stdlib sockets (``BlockingRuntime``); closing it ends the idle threads.

    The server closes the runtime of a manager it made by name once it has stopped.
    """

    def __init__(self, manager: ThreadManager) -> None:
        self._manager = manager

    def close(self) -> None:
        """End the manager's idle threads (``ThreadManager.close``)."""
        self._manager.close()

    def spawn_soon(self, thunk: Callable[[], Any]) -> None:
        """Run ``thunk`` in an idle thread, or a new one (``Server.submit``): no task, no limit."""
        self._manager.spawn_soon(thunk)

    def __repr__(self) -> str:
        return f"<ThreadRuntime of {self._manager!r}>"


class _Idle:
    """An idle thread as ``add_task`` sees it: the lock it waits on, the job it gets."""

    __slots__ = ("job", "thread", "wake")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.job: _Job | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held until somebody hands this thread a job (or closes)


class ThreadManager:
    """A thread per task, reusing the threads of ended tasks, with an optional ``limit``.

    Options:

    - ``limit``: the most tasks held at once (None: no limit). Idle threads hold no
      task and do not count.
    - ``idle_threads`` (default 64): how many threads of ended tasks wait for the
      next task; 0 starts a new thread for every task and lets it exit after.
    - ``idle_expiry`` (default 10 s): how long an idle thread waits before it exits.
    - ``stack_size`` (bytes), when given, is the stack of each new thread; Python
      sets it process-wide through ``threading.stack_size`` for the moment the thread
      starts. A reused thread keeps the stack it was started with.

    Resource handling: ``close()`` ends the idle threads at once (the server calls
    it, through the runtime, on a manager it made by name once it has stopped); a
    later ``add_task`` starts threads and keeps idle ones again.
    """

    def __init__(
        self,
        *,
        limit: int | None = None,
        stack_size: int | None = None,
        idle_threads: int = DEFAULT_IDLE_THREADS,
        idle_expiry: float = DEFAULT_IDLE_EXPIRY,
    ) -> None:
        if isinstance(idle_threads, bool) or not isinstance(idle_threads, int):
            raise TypeError(
                f"threads manager: idle_threads must be an integer, not {idle_threads!r}"
            )
        if idle_threads < 0:
            raise ValueError(
                f"threads manager: idle_threads must be 0 or more, not {idle_threads}"
                " (0 starts a new thread for every task)"
            )
        if (
            isinstance(idle_expiry, bool)
            or not isinstance(idle_expiry, (int, float))
            or not (0 < idle_expiry < math.inf)
        ):
            raise ValueError(
                "threads manager: idle_expiry must be a positive number of seconds, not"
                f" {idle_expiry!r}, such as idle_expiry=10 (idle_threads=0 keeps no idle thread)"
            )
        if stack_size is not None:
            _check_stack_size(stack_size)
        self._table: TaskTable[TaskState] = TaskTable(limit, "threads manager")
        self._stack_size = stack_size
        self._stack_lock = threading.RLock()
        self._idle_threads = idle_threads
        self._idle_expiry = float(idle_expiry)
        # Guards _idle and _closed; every hand-off and every expiry is decided under it.
        # Re-entrant, as the stack's: a signal handler calling Server.submit() in a
        # thread that is itself handing a call over takes them again (a deadlock).
        self._idle_lock = threading.RLock()
        self._idle: list[_Idle] = []  # a stack: the most recently idled thread last
        self._closed = False  # set by close(): threads ending tasks exit, not idle
        self.runtime: BlockingRuntime = ThreadRuntime(self)
        _MANAGERS.add(self)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    @property
    def idle_threads(self) -> int:
        """How many threads of ended tasks are kept waiting for the next task."""
        return self._idle_threads

    @property
    def idle_expiry(self) -> float:
        """Seconds an idle thread waits for a task before it exits."""
        return self._idle_expiry

    def idle(self) -> int:
        """How many threads wait for a task now."""
        with self._idle_lock:
            return len(self._idle)

    def __repr__(self) -> str:
        return f"<ThreadManager limit={self.limit} tasks={len(self._table)} idle={self.idle()}>"

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        """Run ``thunk`` in an idle thread, or else in a new daemon thread; named after it."""
        task_id = self._table.reserve()
        name = getattr(thunk, "__name__", "") or f"weft task {task_id}"
        state = TaskState(task_id, name)
        self._table.put(task_id, state)
        # Captured here, so the task sees the add_task caller's contextvars, and each
        # task has a context of its own even on a reused thread.
        context = contextvars.copy_context()
        try:
            self._hand_over((state, thunk, context), name)
        except BaseException:
            self._table.pop(task_id)
            raise
        return task_id

    def spawn_soon(self, thunk: Callable[[], Any]) -> None:
        """Run ``thunk`` as add_task would, but as no task: no id, not counted in ``limit``.

        The runtime's ``spawn_soon`` (``Server.submit``): ``thunk`` settles its own
        outcome and runs in the context it brings.
        """
        self._hand_over((None, thunk, None), SUBMIT_THREAD_NAME)

    def _hand_over(self, job: _Job, name: str) -> None:
        """Give ``job`` to the newest idle thread, or to a new daemon thread named ``name``."""
        with self._idle_lock:
            self._closed = False
            idle = self._idle.pop() if self._idle else None
            if idle is not None:
                idle.job = job
        if idle is not None:
            idle.wake.release()
            return
        # The job goes in a list the thread empties: Thread keeps its args until its
        # target returns, and a thread kept idle must not keep its first connection.
        thread = threading.Thread(target=self._work, args=([job],), name=name, daemon=True)
        if self._stack_size is None:
            thread.start()
            return
        with self._stack_lock:
            previous = threading.stack_size(self._stack_size)
            try:
                thread.start()
            finally:
                threading.stack_size(previous)

    def _work(self, first: list[_Job]) -> None:
        """A thread's life: run its task, then wait for the next while one comes in time."""
        state, thunk, context = first.pop()
        idle: _Idle | None = None
        while True:
            if state is None:
                _run_call(thunk)
            else:
                try:
                    run_task(state, thunk, context)
                finally:
                    self._table.pop(state.id)
            # An idle thread must not keep the last task's connection or values alive.
            del state, thunk, context
            if self._idle_threads == 0:
                return
            if idle is None:
                idle = _Idle(threading.current_thread())
            job = self._wait_for_job(idle)
            if job is None:
                return
            state, thunk, context = job
            del job
            idle.thread.name = SUBMIT_THREAD_NAME if state is None else state.name

    def _wait_for_job(self, idle: _Idle) -> _Job | None:
        """Wait up to ``idle_expiry`` for ``add_task`` to hand over a job; None: exit."""
        idle.thread.name = IDLE_THREAD_NAME
        with self._idle_lock:
            if self._closed or len(self._idle) >= self._idle_threads:
                return None
            self._idle.append(idle)
        if not idle.wake.acquire(timeout=self._idle_expiry):
            with self._idle_lock:
                if idle in self._idle:
                    # Nobody took this thread while it waited: it expires.
                    self._idle.remove(idle)
                    return None
            # add_task (or close) took it off the list as the wait ran out; the
            # release is on its way, and the job with it (None from close).
            idle.wake.acquire()
        job, idle.job = idle.job, None
        return job

    def close(self) -> None:
        """End the idle threads now (waiting up to ``CLOSE_JOIN`` in all for them to exit).

        Threads still running tasks exit when their task ends, until the next
        ``add_task``, after which threads are kept idle again.
        """
        with self._idle_lock:
            self._closed = True
            ended, self._idle = self._idle, []
        for idle in ended:
            idle.wake.release()  # with no job: the thread exits
        deadline = time.monotonic() + CLOSE_JOIN
        for idle in ended:
            idle.thread.join(max(0.0, deadline - time.monotonic()))

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


def _run_call(thunk: Callable[[], Any]) -> None:
    """Run a ``spawn_soon`` thunk, which settles its own outcome; what escapes is logged."""
    try:
        thunk()
    except BaseException:
        log.exception("a call started by spawn_soon raised; ignored")


def _check_stack_size(value: object) -> None:
    """Refuse, when the manager is made, a stack size no thread could start with.

    Asked of ``threading.stack_size`` itself (then set back): what this platform
    takes (0, or at least 32 KiB, perhaps in pages), rather than a rule of ours.
    Then one thread is started with it and joined: a size the platform takes but
    cannot map (64 GiB) passed, and the server bound, said it listened, and failed
    to start its acceptor (exit 1; under ``--workers`` a worker crash loop).
    Without it, the first connection failed with a traceback from ``run()``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"threads manager: stack_size must be a number of bytes, not {value!r}")
    advice = " give 0 (the platform's) or a number of bytes, 32 KiB or more, such as 262144"
    try:
        previous = threading.stack_size(value)
    except ValueError as exc:
        raise ValueError(
            f"threads manager: stack_size={value} cannot be a thread's stack ({exc});{advice}"
        ) from None
    try:
        probe = threading.Thread(target=_nothing, name="weft threads: stack_size check")
        probe.start()
        probe.join()
    except RuntimeError as exc:  # "can't start new thread": the stack cannot be mapped
        raise ValueError(
            f"threads manager: no thread starts with stack_size={value} ({exc});{advice}"
        ) from None
    finally:
        threading.stack_size(previous)


def _nothing() -> None:
    """What the stack size's trial thread runs."""
