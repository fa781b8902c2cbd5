"""Task state shared by managers, the server and the running task.

Weft's ``*shutdown*`` flag becomes :func:`shutdown_requested`, read from a context
variable that the manager sets inside each task. :class:`TaskState` holds that flag
and the callbacks that make a shutdown reach a task blocked in I/O: ``on_shutdown``
callbacks run when the flag is set (phase 2 of a stop; the acceptor registers the
runtime's ``wake_listener`` there), ``on_interrupt`` callbacks when the task is
interrupted (phase 3). A connection registers none: the server ends its input and
aborts its socket itself. :class:`TaskTable` is the bookkeeping every manager needs
(unique ids, the limit, the table of live tasks), written once.

Managers call :func:`run_task` / :func:`run_async_task` around each thunk so that
``TaskShutdown`` is swallowed, other errors are reported, and contextvars of the
``add_task`` caller are visible inside the task.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable
from threading import get_ident as _get_ident
from types import FunctionType
from typing import Any, Generic, TypeVar

from ._errors import ManagerFullError, TaskShutdown, is_cancellation
from ._logsafe import log_untrusted_exception
from ._osthreads import thread_primitives

__all__ = [
    "Done",
    "TaskState",
    "TaskTable",
    "current_task",
    "run_async_task",
    "run_task",
    "shutdown_requested",
]

log = logging.getLogger("weft.tasks")

#: How long a manager that cannot kill tasks waits for an interrupted one to end
#: before giving up on it (see TaskState.interrupt_and_wait).
INTERRUPT_GRACE = 2.0

_current_task: contextvars.ContextVar[TaskState | None] = contextvars.ContextVar(
    "weft_current_task", default=None
)

T = TypeVar("T")


class Done:
    """A one-shot flag with ``threading.Event``'s ``set``/``is_set``/``wait``.

    The real Event (a Condition and a lock, about 1 KiB) is made only when somebody
    waits, which for most connections is never: an idle connection costs a few bytes
    here instead of a kilobyte, and a short one saves the allocation.
    """

    __slots__ = ("_event", "_flag")
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None

    def set(self) -> None:
        """Mark done and wake every waiter."""
        self._flag = True
        event = self._event
        if event is not None:
            event.set()

    def is_set(self) -> bool:
        """True once done."""
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout``; True if done."""
        if self._flag:
            return True
        event = self._event
        if event is None:
            with Done._create_lock:
                if self._event is None:
                    self._event = threading.Event()
                event = self._event
        # set() writes the flag before it reads _event, and we wrote _event before
        # reading the flag, so one of us always sees the other.
        if self.is_set():
            return True
        return event.wait(timeout)


#: Guards every TaskState's flags and callbacks: held for a few bytecodes at a time,
#: and one lock for all states costs nothing per connection.
_state_lock = threading.Lock()


class TaskState:
    """One task's shutdown state: the flag, and what ending or interrupting it means."""

    __slots__ = (
        "_done",
        "_ended",
        "_interrupt_callbacks",
        "_shutdown_callbacks",
        "connection",
        "id",
        "interrupted",
        "name",
        "requested",
        "thread",
    )

    def __init__(self, task_id: Hashable, name: str = "") -> None:
        self.id = task_id
        self.name = name
        self.requested = False
        self.interrupted = False
        self._done: Done | None = None
        self._ended = False
        # Tuples, not lists: a task has one or two of each, and () is shared.
        self._shutdown_callbacks: tuple[Callable[[], object], ...] = ()
        self._interrupt_callbacks: tuple[Callable[[], object], ...] = ()
        #: The ``ConnectionInfo`` of the connection this task serves, while its
        #: handler runs (set by the server; ``current_connection()`` reads it).
        self.connection: Any = None
        #: The thread it runs in, once made current: code in another thread with a
        #: copy of its context (``asyncio.to_thread``) is not inside it, and may block.
        self.thread: int | None = None

    def __repr__(self) -> str:
        return f"<TaskState {self.id!r} {self.name!r} requested={self.requested}>"

    @property
    def done(self) -> Done:
        """Set once the task has ended, whatever way it ended (see :meth:`set_done`).

        Made on first use: most tasks meet it only as they end, so an idle
        connection holds no object for it, and a task nobody waits for has none.
        """
        done = self._done
        if done is None:
            with _state_lock:
                if self._done is None:
                    self._done = Done()
                done = self._done
            # set_done() writes _ended before it reads _done, and we wrote _done
            # before reading _ended, so one of us always sets it.
            if self._ended:
                done.set()
        return done

    def set_done(self) -> None:
        """Mark the task ended: ``done`` is set, and made only if somebody waits on it.

        What a manager calls as a task ends (``run_task`` does); ``done.set()`` works
        too, at the price of the object.
        """
        self._ended = True
        done = self._done
        if done is not None:
            done.set()

    def make_current(self) -> None:
        """Make this the task that :func:`current_task` and :func:`shutdown_requested` see.

        Sets a context variable in the running context: call it first thing inside
        the task. ``run_task`` and ``run_async_task`` do; a manager that runs thunks
        its own way calls it itself.
        """
        self.thread = _get_ident()
        _current_task.set(self)

    def on_shutdown(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when shutdown is requested (at once if it already was)."""
        with _state_lock:
            if not self.requested:
                self._shutdown_callbacks += (callback,)
                return
        _call_quietly(callback)

    def on_interrupt(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` if the task has to be interrupted (at once if it already was)."""
        with _state_lock:
            if not self.interrupted:
                self._interrupt_callbacks += (callback,)
                return
        _call_quietly(callback)

    def request_shutdown(self) -> None:
        """Set the flag and run the shutdown callbacks, once. Safe from any thread."""
        with _state_lock:
            if self.requested:
                return
            self.requested = True
            callbacks, self._shutdown_callbacks = self._shutdown_callbacks, ()
        for callback in callbacks:
            _call_quietly(callback)

    def interrupt_and_wait(self, grace: float = INTERRUPT_GRACE) -> bool:
        """Interrupt, then wait up to ``grace`` for the task to end; True if it did.

        For managers that cannot kill a task (threads): interrupting shuts its
        connection down, which ends any blocking I/O at once, but a task stuck in
        pure computation goes on; it is logged and left to finish on its own, since
        a stop must not hang on it forever.
        """
        self.interrupt()
        if self.done.wait(grace):
            return True
        log.debug(
            "task %s (%s) is still running %.1fs after it was interrupted; a thread "
            "cannot be killed, so it is left to finish on its own",
            self.id,
            self.name,
            grace,
        )
        return False

    def interrupt(self) -> bool:
        """Request shutdown, then run the interrupt callbacks, once; True the first time.

        Safe from any thread, and never blocks: phase 3 of a stop calls it on every
        remaining task at once. A manager that can interrupt a task waiting in its
        runtime (kill a greenlet, cancel a scope) overrides it in its TaskState
        subclass to schedule that too when this returns True.
        """
        self.request_shutdown()
        with _state_lock:
            if self.interrupted:
                return False
            self.interrupted = True
            callbacks, self._interrupt_callbacks = self._interrupt_callbacks, ()
        for callback in callbacks:
            _call_quietly(callback)
        return True


def _call_quietly(callback: Callable[[], object]) -> None:
    # Callbacks shut sockets down; the socket may already be closed by its task,
    # which is the outcome the callback wanted anyway.
    try:
        callback()
    except OSError:
        pass
    except BaseException as exc:
        # Whatever it raises (a custom BaseException, another runtime's cancellation)
        # must not cut the stop's step short for the callbacks after it; only the
        # calling task's own interruption goes on.
        if is_interruption(exc):
            raise
        log_untrusted_exception(log, logging.ERROR, exc, "shutdown callback %r failed", callback)


def is_interruption(exc: BaseException) -> bool:
    """True if ``exc`` is the running task's interruption, to be let through.

    ``TaskShutdown`` or a runtime's cancellation, once the task was interrupted
    (phase 3 of its stop: gevent's kill lands at whatever switch the task is in,
    a hook's or a callback's included). Raised by code the task runs without
    that, it is that code's failure: a hook or a callback ends nothing but itself.
    """
    state = _current_task.get()
    return state is not None and state.interrupted and is_cancellation(exc)


def shutdown_requested() -> bool:
    """True when the current task has been asked to stop (Weft's ``*shutdown*``).

    Outside any task it is False.
    """
    state = _current_task.get()
    return state is not None and state.requested


def current_task() -> TaskState | None:
    """The :class:`TaskState` of the task running this code, or None outside tasks."""
    return _current_task.get()


def _report(state: TaskState, exc: BaseException) -> None:
    log.error("task %s (%s) raised", state.id, state.name or "unnamed", exc_info=exc)


def run_task(
    state: TaskState, thunk: Callable[[], object], context: contextvars.Context | None = None
) -> None:
    """Run a sync thunk as the task ``state``, inside ``context`` if given; never raises.

    ``TaskShutdown`` ends the task quietly; any other exception is logged with its
    traceback. ``state.done`` is set at the end either way. A manager whose tasks
    already run in a context of their own (a greenlet's ``gr_context``) passes no
    ``context``: the task's variables are then set in the current one.
    """
    if context is not None:
        context.run(run_task, state, thunk)
        return
    state.thread = _get_ident()  # state.make_current(), without a call per task
    _current_task.set(state)
    try:
        call = type(thunk).__call__
        if type(call) is FunctionType:
            # An object whose __call__ is written in Python (the server's connections)
            # is called through it as a plain function: thunk() would go through C and
            # start one more interpreter frame on the C stack, which a parked greenlet
            # keeps a copy of for as long as it waits.
            call(thunk)
        else:
            thunk()
    except TaskShutdown:
        pass
    except Exception as exc:
        _report(state, exc)
    finally:
        state.set_done()


async def run_async_task(
    state: TaskState,
    thunk: Callable[[], Awaitable[object]],
    context: contextvars.Context | None = None,
) -> None:
    """Await an async thunk as the task ``state``, with ``context``'s variables set.

    The runtime's own cancellation (``trio.Cancelled``) and other BaseExceptions
    propagate so that the runtime can handle them; ``TaskShutdown`` and ordinary
    exceptions are handled as in :func:`run_task`. Without ``context`` the task keeps
    the variables it has (a runtime that copies the spawner's context itself).
    """
    if context is not None:
        for var, value in context.items():
            var.set(value)
    state.make_current()
    try:
        await thunk()
    except TaskShutdown:
        pass
    except Exception as exc:
        _report(state, exc)
    finally:
        state.set_done()


class TaskTable(Generic[T]):
    """Ids, limit and the live tasks of one manager; thread-safe.

    ``reserve`` hands out the next id or raises :class:`ManagerFullError` at the
    limit; the manager stores its own record for the id with ``put`` (or does both
    at once with ``add``) and drops it with ``pop`` when the task ends or is removed.

    Only what must happen together takes the table's lock: the limit's check with
    the id it hands out, and ``put``'s "still reserved?" with its store. Without a
    limit, ``add`` and ``reserve`` take none (the id counter and each store are one
    step each), nor do ``pop`` and ``get``, so a connection's task costs no lock here.
    Readers copy the table in one step (``list(dict)`` runs no Python code, so no
    other thread changes it midway) and never see it half-changed.
    """

    def __init__(self, limit: int | None, owner: str) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"{owner}: limit must be a positive integer or None, not {limit!r}")
        self.limit = limit
        self._owner = owner
        self._ids = itertools.count(1)
        # An OS lock even in a gevent-patched process: nothing switches greenlets
        # while it is held, and gevent's own lock costs a Python call per take.
        self._lock = thread_primitives()[1]()
        self._tasks: dict[int, T | None] = {}

    def reserve(self) -> int:
        """A fresh id, counted against the limit until popped."""
        if self.limit is None:
            task_id = next(self._ids)
            self._tasks[task_id] = None
            return task_id
        with self._lock:
            task_id = self._next_id()
            self._tasks[task_id] = None
            return task_id

    def _next_id(self) -> int:
        """A fresh id, or ManagerFullError at the limit; under the lock."""
        if self.limit is not None and len(self._tasks) >= self.limit:
            raise ManagerFullError(
                f"{self._owner} is full: it already holds {self.limit} tasks (limit={self.limit})"
            )
        return next(self._ids)

    def add(self, make: Callable[..., T], *args: Any) -> T:
        """:meth:`reserve` and :meth:`put` in one: store and return ``make(id, *args)``.

        For a manager that can make its record at once. With a limit, ``make`` runs
        under the table's lock, an OS lock even under gevent: it must not call the
        table, wait, or switch greenlets. A limit set while tasks are being added
        holds for the adds that begin after it.
        """
        if self.limit is None:
            task_id = next(self._ids)
            record = self._tasks[task_id] = make(task_id, *args)
            return record
        with self._lock:
            task_id = self._next_id()
            record = self._tasks[task_id] = make(task_id, *args)
            return record

    def put(self, task_id: int, record: T) -> None:
        """Store the manager's record for a reserved id."""
        with self._lock:
            if task_id in self._tasks:
                self._tasks[task_id] = record

    def get(self, task_id: Hashable) -> T | None:
        """The record for ``task_id``, or None."""
        return self._tasks.get(task_id)  # type: ignore[call-overload,no-any-return]

    def pop(self, task_id: Hashable) -> bool:
        """Forget ``task_id``; True if it was there.

        A ``pop`` of an id ``put`` has not filled yet (only an id guessed before
        ``add_task`` returned it) may be undone by that ``put``; the task's own end
        pops it again.
        """
        return self._tasks.pop(task_id, _MISSING) is not _MISSING  # type: ignore[call-overload]

    def ids(self) -> list[Hashable]:
        """The ids held now."""
        return list(self._tasks)

    def records(self) -> list[T]:
        """The records held now."""
        return [r for r in list(self._tasks.values()) if r is not None]

    def __len__(self) -> int:
        return len(self._tasks)


_MISSING: Any = object()
