"""PoolManager: a fixed pool of worker threads fed by a FIFO queue.

This is Sagittarius' max-thread model. At most ``workers`` tasks run at once; any
more wait in the queue in the order they came, so a flood of clients costs a queue
entry each, not a thread each. ``limit`` bounds queued plus running tasks; beyond
it ``add_task`` raises :class:`~weft_core.ManagerFullError`.

The server's accept loop is itself a task of its manager (DESIGN section 3), and it
runs for as long as the server listens: each listener's acceptor holds one worker
for good. A server on one listener therefore serves ``workers - 1`` connections at
once, and ``workers`` must be at least the number of listeners plus one.

Resource handling: workers are started on demand, up to ``workers``. Closing the
runtime (the server does so once it has stopped, for a manager it made from a
name) retires them as soon as the queue is empty; the next ``add_task`` starts them
again. Everything here is written against weft_core's public API.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from weft_core import BlockingRuntime, TaskState, TaskTable, run_task

__all__ = ["DEFAULT_WORKERS", "MIN_WORKERS", "PoolManager", "PoolRuntime"]


#: Workers when none are asked for: a small pool, as in Sagittarius; one of them
#: goes to the server's acceptor.
DEFAULT_WORKERS = 16
#: One worker for the acceptor of a single listener, at least one for connections.
MIN_WORKERS = 2
#: How long a task may wait with every worker busy before the pool says so.
STARVED_AFTER = 2.0

log = logging.getLogger("weft.pool")


class PoolRuntime(BlockingRuntime):
    """Blocking stdlib sockets, as for ``threads``; closing it retires idle workers."""

    def __init__(self, pool: PoolManager) -> None:
        self._pool = pool

    def close(self) -> None:
        """Let the workers end once the queue is empty (they start again on demand)."""
        self._pool._retire()

    def __repr__(self) -> str:
        return f"<PoolRuntime of {self._pool!r}>"


class _Job:
    """A task as the pool holds it: queued until a worker takes it (``started``)."""

    __slots__ = ("context", "queued_at", "started", "state", "thunk")

    def __init__(
        self, state: TaskState, thunk: Callable[[], Any], context: contextvars.Context
    ) -> None:
        self.state = state
        self.thunk = thunk
        self.context = context
        self.started = False
        self.queued_at = time.monotonic()


class PoolManager:
    """A fixed pool of ``workers`` threads running tasks from a queue.

    ``limit`` (None: no limit) counts queued and running tasks together.
    ``workers`` must be at least 2: the server's acceptor holds one worker per
    listener for as long as it listens (see the module docstring).

    Stopping follows weft's phases: ``stop_task`` flags the task, waits up to
    ``timeout``, then interrupts it (for a connection the server shuts its socket
    down) and waits a bounded grace. A task still in the queue is moved to its
    front and flagged, so it runs its cleanup as soon as a worker frees; being
    interrupted, it is taken out of the queue and never runs.
    """

    def __init__(self, *, workers: int = DEFAULT_WORKERS, limit: int | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"pool manager: workers must be an integer, not {workers!r}")
        if workers < MIN_WORKERS:
            raise ValueError(
                f"pool manager: workers must be at least {MIN_WORKERS}, not {workers}: the "
                "server's acceptor holds one worker per listener for as long as it listens, "
                "so a pool needs one worker per listener plus at least one for connections"
            )
        self._workers = workers
        self._table: TaskTable[_Job] = TaskTable(limit, "pool manager")
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._threads = 0  # workers alive
        self._idle = 0  # workers waiting for a job
        self._closing = False
        self._serial = 0  # numbers worker threads' names
        #: The timer watching a task queued with every worker busy (None: none).
        self._watch: threading.Timer | None = None
        #: Said that every worker is busy; said again only once the queue has emptied.
        self._warned = False
        self.runtime = PoolRuntime(self)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once, queued or running (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    @property
    def workers(self) -> int:
        """The most tasks that run at once."""
        return self._workers

    def queued(self) -> list[Hashable]:
        """Ids of the tasks waiting for a worker, in the order they will run."""
        with self._cond:
            return [job.state.id for job in self._queue]

    def __repr__(self) -> str:
        with self._cond:
            queued = len(self._queue)
        return (
            f"<PoolManager workers={self._workers} limit={self.limit} "
            f"tasks={len(self._table)} queued={queued}>"
        )

    # -- the protocol ----------------------------------------------------------------

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        """Queue ``thunk``; a free worker runs it. Raises ManagerFullError at ``limit``."""
        task_id = self._table.reserve()
        name = getattr(thunk, "__name__", "") or f"weft task {task_id}"
        # Captured here, so the task sees the add_task caller's contextvars.
        job = _Job(TaskState(task_id, name), thunk, contextvars.copy_context())
        self._table.put(task_id, job)
        with self._cond:
            self._closing = False
            self._queue.append(job)
            try:
                self._spawn_if_needed()
            except BaseException:
                self._queue.remove(job)
                self._table.pop(task_id)
                raise
            self._cond.notify()
            if self._threads >= self._workers and not self._idle:
                self._watch_queue(STARVED_AFTER)
        return task_id

    def _watch_queue(self, delay: float) -> None:
        """Look at the queue in ``delay`` seconds (:meth:`_starved`). Holds ``_cond``."""
        if self._watch is None and not self._warned:
            self._watch = threading.Timer(delay, self._starved)
            self._watch.daemon = True
            self._watch.start()

    def _starved(self) -> None:
        """Say so once the oldest queued task has waited ``STARVED_AFTER`` with every worker busy.

        A server on as many listeners as the pool has workers gives each worker to an
        acceptor for good, and then serves no one: the pool cannot tell an acceptor
        from a long connection, so it names the likely cause rather than refuse.
        """
        with self._cond:
            self._watch = None
            if not self._queue or self._idle or self._closing:
                return
            waited = time.monotonic() - self._queue[0].queued_at
            if waited < STARVED_AFTER:
                self._watch_queue(STARVED_AFTER - waited)
                return
            self._warned = True
            waiting = len(self._queue)
        log.warning(
            "pool manager: all %d workers have been busy for %gs with %d task(s) waiting:"
            " each of the server's listeners holds a worker for its acceptor as long as it"
            " listens, so give workers at least the listeners plus one, and more for"
            " connections served at once",
            self._workers,
            STARVED_AFTER,
            waiting,
        )

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (a queued one still runs later); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Flag the task, wait up to ``timeout``, then interrupt it; return once it ended.

        Returns True if it ended before it had to be interrupted. A task still in
        the queue is moved to its front, so that the next free worker runs it with
        ``shutdown_requested()`` already true and its cleanup runs (an acceptor
        closes its listener); if no worker frees within ``timeout``, it is taken out
        of the queue and never runs.
        """
        job = self._table.get(task_id)
        if job is None:
            return True
        state = job.state
        with self._cond:
            if not job.started:
                # Flagged before any worker can take it (it has no callbacks yet: a
                # task registers those once it runs), and first in line.
                state.request_shutdown()
                self._queue.remove(job)
                self._queue.appendleft(job)
        state.request_shutdown()
        if state.done.wait(timeout):
            return True
        with self._cond:
            if not job.started:
                # Interrupting a task that never started: it will not run at all.
                # Whoever queued it owns what it would have cleaned up (the server
                # closes a connection whose task never started).
                self._queue.remove(job)
                self._table.pop(task_id)
                state.interrupt()
                state.done.set()
                return False
        state.interrupt_and_wait()  # a thread cannot be killed: it keeps its worker till done
        return False

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks held now, queued or running."""
        return self._table.ids()

    # -- workers ---------------------------------------------------------------------

    def _spawn_if_needed(self) -> None:
        """Start a worker if jobs wait that no idle worker will take. Holds ``_cond``."""
        if self._idle < len(self._queue) and self._threads < self._workers:
            self._serial += 1
            thread = threading.Thread(
                target=self._work, name=f"weft-pool worker {self._serial}", daemon=True
            )
            thread.start()
            self._threads += 1

    def _next_job(self) -> _Job | None:
        """The next job, waiting for one; None when the worker should retire."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    self._threads -= 1
                    return None
                self._idle += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle -= 1
            job = self._queue.popleft()
            job.started = True
            if not self._queue:
                self._warned = False
            return job

    def _work(self) -> None:
        me = threading.current_thread()
        own_name = me.name
        while (job := self._next_job()) is not None:
            me.name = job.state.name  # the worker is named after the task it runs
            try:
                run_task(job.state, job.thunk, job.context)  # never raises an Exception
            except BaseException:
                # SystemExit or KeyboardInterrupt out of a task ends this worker;
                # let another take its place so queued tasks still run.
                with self._cond:
                    self._threads -= 1
                    self._spawn_if_needed()
                raise
            finally:
                me.name = own_name
                self._table.pop(job.state.id)

    def _retire(self) -> None:
        """Let idle workers end, and busy ones once the queue is empty."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            if self._watch is not None:  # nothing to say of a pool closing
                self._watch.cancel()
                self._watch = None
