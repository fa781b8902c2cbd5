"""TrioManager: a trio task per thunk, in one nursery, in the manager's own trio thread.

Where the loop lives
--------------------
``Server.run()`` must return once the socket listens, and the code that called it
is plain blocking Python that keeps working afterwards (it may call
``server.stop()`` later, or serve a second server). trio's loop, ``trio.run``,
blocks the thread that runs it until every task is done, so it cannot run in the
caller's thread. The manager therefore runs ``trio.run`` in a daemon thread of its
own, started lazily by the first ``add_task`` and ended by ``runtime.close()``
(restartable: the next ``add_task`` starts a new one). That thread holds one
nursery, where every task runs, and the run's ``trio.lowlevel.TrioToken``, through
which other threads reach it.

Two kinds of caller reach ``add_task``:

- A foreign thread (``Server.run()`` adding the acceptor, a test): it hops into the
  trio thread with ``TrioToken.run_sync_soon`` and waits for the task to be
  spawned, so errors (a closed loop) reach it. Not with ``trio.from_thread``, which
  refuses a thread that runs a trio loop of its own (an application's ``trio.run``,
  another server's handler).
- A task of this manager (the acceptor, adding one task per connection: the hot
  path): it calls ``nursery.start_soon`` directly, with no thread hop.

``stop_task`` blocks, so it waits on ``TaskState.done`` (which blocks the calling
OS thread) from a foreign thread. Called from inside the trio thread it would block the very loop
the task needs in order to end, a deadlock, so it raises ``RuntimeError`` there;
trio code awaits :meth:`TrioManager.astop_task` instead.

Error handling:
    Each task runs as ``weft_core.run_async_task`` would run it (written out in
    ``TrioManager._run``): its ordinary exceptions are reported and ``TaskShutdown``
    is swallowed. Nothing a task raises reaches the nursery, since that would
    cancel every other task (trio's own ``serve_listeners`` lets one handler crash
    the server; weft must not): the task's own cancellation is caught by its own
    ``CancelScope``, and anything else that escapes (``SystemExit``, a
    ``BaseExceptionGroup``) is logged and dropped.

Interruption:
    Each task runs inside its own ``trio.CancelScope``. Interrupting it (phase 3,
    ``_Task.interrupt``, from any thread: ``stop_task`` once its ``timeout`` runs
    out, or the server's stop on every remaining task at once) cancels exactly that
    scope, so only that task sees ``trio.Cancelled``; its ``finally`` blocks and
    shielded cleanup still run, and ``stop_task`` returns once they have, or after
    at most ``INTERRUPT_GRACE``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from weft_core import TaskShutdown, TaskState, TaskTable

from ._runtime import TrioRuntime

__all__ = ["TrioManager"]

log = logging.getLogger("weft.trio")

#: After cancelling a task, how long stop_task waits for it to end: a cancelled task
#: ends at its next checkpoint unless it shields itself or blocks the whole loop
#: (a synchronous call), and a stop must not hang on it. As threads' and gevent's.
INTERRUPT_GRACE = 2.0

#: How long ``runtime.close()`` waits for the trio thread once every task was
#: cancelled: one that ignores its cancellation would hold it for ever. The thread
#: is then left behind, said in a warning (a Server never gets there: it does not
#: close a runtime after a stop that left tasks behind).
CLOSE_WAIT = 5.0

#: Name of the daemon thread that runs ``trio.run`` (seen in thread dumps, py-spy).
LOOP_THREAD_NAME = "weft-trio"
#: While a foreign thread waits for the trio thread to take its call, how often it
#: looks whether that thread has ended without taking it.
LOOP_CHECK = 0.1

_IN_LOOP_MESSAGE = (
    "TrioManager.stop_task() blocks until the task has ended, and was called from inside "
    "the manager's own trio thread, where blocking would keep the task from ever ending "
    "(a deadlock); from trio code, use 'await manager.astop_task(task_id, timeout)'"
)


#: Which manager's loop the current thread runs, if any. A thread-local rather than
#: a comparison with ``manager._loop``: close() forgets the loop before its tasks
#: have ended, and those tasks must still be recognised as running inside it.
_thread = threading.local()


class _Loop:
    """One ``trio.run`` in a daemon thread, holding the nursery tasks are spawned into."""

    __slots__ = ("closing", "error", "nursery", "owner", "ready", "soon", "thread", "token")

    def __init__(self, owner: TrioManager) -> None:
        self.owner = owner
        #: Thunks other threads gave spawn_soon, waiting for this loop to start them.
        self.soon = _Soon(self)
        self.ready = threading.Event()
        self.closing = False
        self.error: BaseException | None = None
        self.nursery: trio.Nursery | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.thread = threading.Thread(target=self._main, name=LOOP_THREAD_NAME, daemon=True)

    def start(self) -> None:
        """Start the thread and return once its nursery is open."""
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            self.thread.join()
            raise RuntimeError("weft-trio: the trio loop thread failed to start") from self.error

    def _main(self) -> None:
        _thread.loop = self
        try:
            trio.run(self._serve)
        except BaseException as exc:  # a daemon thread has nobody to raise to
            self.error = exc
            if self.ready.is_set():
                log.critical("the trio loop thread crashed", exc_info=exc)
        finally:
            self.ready.set()

    async def _serve(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.ready.set()
            await trio.sleep_forever()

    def in_thread(self) -> bool:
        """True if the caller is this loop's trio thread."""
        return getattr(_thread, "loop", None) is self

    def cancel(self) -> None:
        """Cancel the nursery, ending every task and then ``trio.run``; in the trio thread."""
        self.closing = True
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Cancel the nursery and, unless called from the trio thread itself, join it."""
        assert self.token is not None
        if self.in_thread():
            self.cancel()  # the thread ends once the calling task returns
            return
        # RunFinishedError: it has ended already; OSError: it crashed, its wake-up
        # socket closed with it.
        with contextlib.suppress(trio.RunFinishedError, OSError):
            self.token.run_sync_soon(self.cancel)
        self.thread.join(CLOSE_WAIT)
        if self.thread.is_alive():
            log.warning(
                "the trio thread still runs %.0fs after its tasks were cancelled: a task"
                " ignores its cancellation (or the loop is blocked); it is left behind",
                CLOSE_WAIT,
            )


class _Soon:
    """One loop's queue of ``spawn_soon`` thunks from other threads, and whether a wake-up is on its way.

    Lock-free, so that a signal handler that interrupted ``add`` in its own thread
    can add too (trio's own ``run_sync_soon`` takes a re-entrant lock for the same
    reason): ``deque.append`` and ``popleft`` are atomic, and a caller appends
    before it reads the flag while the loop clears the flag before it drains, so a
    caller that sees a wake-up on its way is sure that wake-up takes its thunk.
    """

    __slots__ = ("loop", "queued", "waking")

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        self.queued: collections.deque[Callable[[], Awaitable[object]]] = collections.deque()
        self.waking = False

    def add(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Queue ``thunk``; wake the loop unless a wake-up is on its way; any thread."""
        token = self.loop.token
        assert token is not None
        self.queued.append(thunk)
        if self.waking:
            return
        self.waking = True
        try:
            token.run_sync_soon(self.start)
        except trio.RunFinishedError:
            self.queued.clear()  # nothing runs there any more: the server cancels them

    def start(self) -> None:
        """Start what was queued before this wake-up; a run_sync_soon callback.

        Only that much: what callers add meanwhile comes with a wake-up of its own,
        so a flood of submits cannot keep the loop in here.
        """
        self.waking = False
        loop = self.loop
        batch = [self.queued.popleft() for _ in range(len(self.queued))]
        if loop.nursery is None or loop.closing:
            return  # the thunks' futures are failed by the stop closing the runtime
        for thunk in batch:
            try:
                loop.nursery.start_soon(_light, thunk)
            except RuntimeError:  # the nursery closed: raised here, it crashed trio
                return


class _Task(TaskState):
    """One task: its state, its loop and its own cancel scope.

    A TaskState itself rather than a record holding one: an object less per task.
    """

    __slots__ = ("ended", "loop", "scope")

    def __init__(self, task_id: Hashable, name: str) -> None:
        super().__init__(task_id, name)
        #: The loop it was spawned in (set by _spawn, in that loop's thread).
        self.loop: _Loop | None = None
        #: This task's own scope: cancelling it interrupts this task and no other.
        self.scope = trio.CancelScope()
        #: Made only by ``astop_task``, which waits for the task in the trio thread.
        self.ended: trio.Event | None = None

    def interrupt(self) -> bool:
        """Interrupt as TaskState does, and cancel this task's scope; from any thread."""
        if not super().interrupt():
            return False
        loop = self.loop
        if loop is None or loop.in_thread():
            self.scope.cancel()
        elif loop.token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # ended: so has the task
                loop.token.run_sync_soon(self.scope.cancel)
        return True


async def _light(thunk: Callable[[], Awaitable[object]]) -> None:
    """Run a ``spawn_soon`` thunk; nothing but the nursery's own cancellation reaches it."""
    try:
        await thunk()
    except trio.Cancelled:
        raise
    except BaseException:
        log.exception("a task started by spawn_soon raised %r; ignored", thunk)


def _only_cancellation(exc: BaseException) -> bool:
    """True for ``trio.Cancelled`` and for exception groups made only of it."""
    if isinstance(exc, trio.Cancelled):
        return True
    # BaseExceptionGroup is a builtin only from Python 3.11; duck-type it for 3.10.
    inner = getattr(exc, "exceptions", None)
    return isinstance(inner, tuple) and all(_only_cancellation(e) for e in inner)


class TrioManager:
    """A trio task per thunk, in one nursery in the manager's own trio thread.

    Thunks are zero-argument callables returning an awaitable (``async def``
    handlers, bound with their arguments). ``limit`` caps how many tasks are held
    at once (``ManagerFullError`` beyond it). Each trio task is named after the
    thunk's ``__name__``.

    Resource handling: the trio thread starts at the first :meth:`add_task` and
    ends at ``runtime.close()``, which cancels whatever still runs there.
    """

    def __init__(self, *, limit: int | None = None) -> None:
        self._table: TaskTable[_Task] = TaskTable(limit, "trio manager")
        self._loop: _Loop | None = None
        self._loop_lock = threading.Lock()
        self._runtime = TrioRuntime(self._close_loop, self._run_in_loop, self._spawn_soon)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    @property
    def runtime(self) -> TrioRuntime:
        """The trio runtime the server uses inside this manager's tasks."""
        return self._runtime

    def __repr__(self) -> str:
        running = self._loop is not None
        return f"<TrioManager limit={self.limit} tasks={len(self._table)} running={running}>"

    # -- adding ------------------------------------------------------------------------

    def add_task(self, thunk: Callable[[], Awaitable[object]]) -> Hashable:
        """Spawn ``thunk()`` as a trio task in the manager's nursery; return its id.

        From a task of this manager the task is spawned at once, with no thread hop;
        from any other thread, this waits for the trio thread (started if needed) to
        spawn it.
        """
        task_id = self._table.reserve()
        try:
            name = getattr(thunk, "__name__", "") or f"weft task {task_id}"
            state = _Task(task_id, name)
            loop: _Loop | None = getattr(_thread, "loop", None)
            if loop is not None and loop.owner is self:
                # trio gives the new task a copy of the caller's context itself.
                self._spawn(loop, task_id, state, thunk, None)
            else:
                self._add_from_thread(task_id, state, thunk, contextvars.copy_context())
        except BaseException:
            self._table.pop(task_id)
            raise
        return task_id

    def _add_from_thread(
        self,
        task_id: int,
        state: _Task,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context,
    ) -> None:
        while True:
            loop = self._running_loop()
            spawned = _call_in(
                loop,
                functools.partial(
                    self._spawn_unless_closing, loop, task_id, state, thunk, context
                ),
            )
            if spawned:
                return
            # close() ended this loop between our choosing it and the hop, or it
            # died; the next _running_loop() call starts a fresh one.
            with self._loop_lock:
                if self._loop is loop:
                    self._loop = None

    def _running_loop(self) -> _Loop:
        with self._loop_lock:
            if self._loop is None:
                loop = _Loop(self)
                loop.start()
                self._loop = loop
            return self._loop

    def _spawn_unless_closing(
        self,
        loop: _Loop,
        task_id: int,
        state: _Task,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context,
    ) -> bool:
        """:meth:`_spawn` for a foreign thread, which retries on a new loop if False."""
        if loop.closing:
            return False
        self._spawn(loop, task_id, state, thunk, context)
        return True

    def _spawn(
        self,
        loop: _Loop,
        task_id: int,
        state: _Task,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context | None,
    ) -> None:
        """Start the task in ``loop``'s nursery; in the trio thread.

        A task of a closing loop may still add tasks: they start cancelled and end
        at once, as their siblings do.
        """
        assert loop.nursery is not None
        state.loop = loop
        self._table.put(task_id, state)
        loop.nursery.start_soon(self._run, state, thunk, context, name=state.name)

    async def _run(
        self,
        record: _Task,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context | None,
    ) -> None:
        # What run_async_task does, written out: each coroutine layer here is kept by
        # every idle connection, and this is the only one between trio and the thunk.
        state = record
        if context is not None:
            for var, value in context.items():
                var.set(value)
        state.make_current()
        try:
            with record.scope:
                await thunk()
        except TaskShutdown:
            pass
        except BaseException as exc:
            # Nothing may reach the nursery: it would cancel every other task.
            # Cancellation from outside our scope means close() is cancelling the
            # whole nursery; the task just ends.
            if not _only_cancellation(exc):
                log.error(
                    "task %s (%s) raised %s; other tasks go on",
                    state.id,
                    state.name,
                    type(exc).__name__,
                    exc_info=exc,
                )
        finally:
            # Forgotten before done is set: once stop_task returns, the id is no
            # longer in all_tasks().
            self._table.pop(state.id)
            state.set_done()
            if record.ended is not None:
                record.ended.set()

    # -- removing and stopping ---------------------------------------------------------

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (it goes on running); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Ask the task to stop, cancel it after ``timeout``; return once it has ended.

        The flag (phase 2) sets the task's shutdown flag and runs its shutdown
        callbacks, then waits up to ``timeout`` seconds (None: forever). The interrupt
        (phase 3) runs the interrupt callbacks and cancels the task's own scope, then
        waits at most ``INTERRUPT_GRACE`` for its cleanup to finish. Returns True if
        the task ended before it had to be interrupted, or was not held. Must not be
        called from inside the manager's trio thread (``RuntimeError``); use
        :meth:`astop_task` there.
        """
        loop: _Loop | None = getattr(_thread, "loop", None)
        if loop is not None and loop.owner is self:
            raise RuntimeError(_IN_LOOP_MESSAGE)
        record = self._table.get(task_id)
        if record is None:
            return True
        state = record
        state.request_shutdown()
        if state.done.wait(timeout):
            return True
        record.interrupt()  # cancels its scope in the trio thread
        if not state.done.wait(INTERRUPT_GRACE):
            log.debug(
                "task %s (%s) is still running %.1fs after it was cancelled: its trio "
                "loop is blocked, or it shields itself; it is left to finish on its own",
                task_id,
                state.name,
                INTERRUPT_GRACE,
            )
        return False

    async def astop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """:meth:`stop_task` for trio code running in this manager's trio thread."""
        record = self._table.get(task_id)
        if record is None:
            return True
        if record.loop is None or not record.loop.in_thread():
            raise RuntimeError(
                "TrioManager.astop_task() must be awaited in the manager's own trio thread; "
                "from other threads call stop_task()"
            )
        state = record
        state.request_shutdown()
        if state.done.is_set():
            return True
        if record.ended is None:
            record.ended = trio.Event()
        if timeout is None:
            await record.ended.wait()
            return True
        with trio.move_on_after(max(timeout, 0.0)):
            await record.ended.wait()
            return True
        record.interrupt()  # runs its interrupt callbacks and cancels its scope
        with trio.move_on_after(INTERRUPT_GRACE):  # as stop_task: bounded, not for ever
            await record.ended.wait()
            return False
        log.debug(
            "task %s (%s) is still running %.1fs after it was cancelled: it shields"
            " itself or ignores its cancellation; it is left to finish on its own",
            task_id,
            state.name,
            INTERRUPT_GRACE,
        )
        return False

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks held now (spawned or being spawned, not yet ended)."""
        return self._table.ids()

    # -- the loop thread ---------------------------------------------------------------

    def _run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the trio thread, if one runs; True once it has, False on timeout."""
        loop: _Loop | None = getattr(_thread, "loop", None)
        if loop is None or loop.owner is not self:
            with self._loop_lock:
                loop = self._loop
            if loop is not None and loop.token is not None:
                ran = threading.Event()

                def call() -> None:
                    # A run_sync_soon callback: an exception here would crash trio.
                    try:
                        fn()
                    except Exception:
                        log.exception("%r failed in the trio thread", fn)
                    finally:
                        ran.set()

                try:
                    loop.token.run_sync_soon(call)
                except trio.RunFinishedError:
                    pass  # it has just ended: nothing runs there any more
                else:
                    return ran.wait(timeout)
        fn()
        return True

    def _spawn_soon(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Start ``thunk`` as a light task of the nursery (``Server.submit``); any thread.

        In the trio thread it starts at once. From another thread it is queued, and
        only a call that finds no wake-up on its way wakes the loop
        (``TrioToken.run_sync_soon``, which writes to trio's wake-up socket): one
        wake-up starts every thunk queued until the loop drains the queue. The
        queue is the loop's (:class:`_Soon`), and takes no lock: a signal handler
        calling ``submit()`` while its own thread was in here deadlocked on one.
        """
        loop: _Loop | None = getattr(_thread, "loop", None)
        if loop is not None and loop.owner is self and loop.nursery is not None:
            loop.nursery.start_soon(_light, thunk)
            return
        loop = self._loop  # one read, no lock (see above)
        if loop is None or loop.token is None:
            raise RuntimeError("weft-trio: no trio thread runs (the server is not running)")
        loop.soon.add(thunk)

    def _close_loop(self) -> None:
        """End the trio thread, if one runs: cancel every task, then join it."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()


def _call_in(loop: _Loop, fn: Callable[[], bool]) -> bool:
    """``fn()`` in ``loop``'s trio thread, from any other thread; False if the loop ended.

    ``fn``'s exception is raised here. The caller's thread waits, whatever it runs
    (a trio loop of its own included), as ``add_task`` from another thread does.
    """
    token = loop.token
    assert token is not None
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:  # a run_sync_soon callback: it must not raise
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    try:
        token.run_sync_soon(call)
    except trio.RunFinishedError:
        return False
    while not done.wait(LOOP_CHECK):
        if not loop.thread.is_alive():  # ended before it took the call
            return False
    ok, value = outcome[0]
    if not ok:
        raise value
    return bool(value)
