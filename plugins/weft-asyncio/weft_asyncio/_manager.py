"""AsyncioManager: an asyncio task per thunk, on the manager's own loop or the application's.

Where the loop lives
--------------------
``Server.run()`` returns once the socket listens, and the code that called it goes
on. Two kinds of caller:

- **Plain blocking code** (a script, ``weft serve``, a test): there is no loop to
  serve on, so the manager starts one (asyncio's, or uvloop's with
  ``loop="uvloop"``) in a daemon thread of its own (``weft-asyncio``) at its first
  task, and ends it in ``runtime.close()``; the next task starts a new one.
- **A coroutine on a running loop** (an application already serving aiohttp, holding
  a database pool): the manager serves on *that* loop, as gevent's manager serves
  on the application's hub once it has monkey-patched. ``run()`` adds the acceptor
  as a task of the running loop and returns at once; handlers share the loop (and
  its pool) with the application's own tasks. ``runtime.close()`` then only lets go
  of the loop, which stays the application's.

The first task decides, and the choice holds until ``runtime.close()``. Other threads
reach the loop with ``call_soon_threadsafe``; a task of the loop (the acceptor,
adding one task per connection: the hot path) creates its task directly.

``stop_task`` blocks, so it cannot run on the loop it would wait for (it raises
``RuntimeError`` there); asyncio code awaits :meth:`AsyncioManager.astop_task`.

Error handling:
    Each task is the thunk's own coroutine, with a done callback: ``TaskShutdown``
    and the manager's own cancellation end it quietly, any other exception is
    logged with its traceback and the other tasks go on.

Interruption:
    Phase 3 of a stop (``_Task.interrupt``, from any thread) cancels the task
    (``task.cancel()``): the handler sees ``asyncio.CancelledError`` at its next
    ``await``, its ``finally`` blocks run, and the manager swallows it, as it swallows
    ``TaskShutdown``. Cancels from other threads are batched into one call on the
    loop, so interrupting ten thousand tasks wakes the loop once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import importlib
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from weft_core import TaskShutdown, TaskState, TaskTable

from ._runtime import AsyncioRuntime

__all__ = ["LOOPS", "AsyncioManager"]

log = logging.getLogger("weft.asyncio")

#: The event loops the manager can run on its own (option ``loop``).
LOOPS = ("asyncio", "uvloop")

#: After cancelling a task, how long stop_task waits for it to end: a cancelled task
#: ends at its next ``await`` unless it catches the cancellation or blocks the whole
#: loop (a synchronous call), and a stop must not hang on it. As the other managers'.
INTERRUPT_GRACE = 2.0

#: How long ``runtime.close()`` waits for the loop thread once every task was
#: cancelled: one that ignores its cancellation would hold it for ever. The thread
#: is then left behind, said in a warning (a Server never gets there: it does not
#: close a runtime after a stop that left tasks behind).
CLOSE_WAIT = 5.0

#: Name of the daemon thread that runs the manager's own loop (thread dumps, py-spy).
LOOP_THREAD_NAME = "weft-asyncio"

#: The message of the CancelledError a stop's interruption raises in a handler.
CANCEL_MESSAGE = "weft: the server's stop interrupted this task"

_IN_LOOP_MESSAGE = (
    "AsyncioManager.stop_task() blocks until the task has ended, and was called on the "
    "manager's own event loop, where blocking would keep the task from ever ending (a "
    "deadlock); from asyncio code, use 'await manager.astop_task(task_id, timeout)'"
)


def _uvloop_missing() -> ValueError:
    return ValueError(
        "asyncio manager: loop='uvloop' needs uvloop, which is not installed; install it "
        "with pip install 'weft-asyncio[uvloop]', or use loop='asyncio'"
    )


class _Executor(concurrent.futures.ThreadPoolExecutor):
    """The own loop's default executor (``asyncio.to_thread``, ``run_in_executor(None, f)``).

    asyncio's own default executor is shut down, when the loop ends, by waiting for
    every call still running in it, with no bound: a handler's ``to_thread`` call
    that outlived its handler's cancellation held ``runtime.close()`` (and a stop's
    end) until it returned. This one is shut down without waiting, and counts what
    still runs, so that the close can say so.
    """

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="weft-asyncio-executor")
        self.running = 0
        self.running_lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """``ThreadPoolExecutor.submit``, counted until the call ends (or is cancelled)."""
        future = super().submit(fn, *args, **kwargs)
        with self.running_lock:
            self.running += 1
        future.add_done_callback(self._ended)
        return future

    def _ended(self, _future: concurrent.futures.Future[Any]) -> None:
        with self.running_lock:
            self.running -= 1

    def abandon(self) -> int:
        """Shut down without waiting: queued calls are cancelled; how many still run."""
        self.shutdown(wait=False, cancel_futures=True)
        with self.running_lock:
            return self.running


#: ``id()`` of every loop a manager runs in a thread of its own. A Server run from a
#: handler on one of them (a second server made inside the first's connection) is not
#: "on the application's loop": it gets a loop of its own, where it had lived on the
#: first server's, and died when that one stopped, blamed on "an application's loop".
_OWN_LOOPS: set[int] = set()


class _Loop:
    """The loop tasks run on: the manager's own, in a daemon thread, or the application's."""

    __slots__ = (
        "cancels", "error", "executor", "ident", "lock", "loop", "owner", "ready", "soon",
        "soon_tasks", "stopping", "thread", "waking",
    )  # fmt: skip

    def __init__(self, owner: AsyncioManager, loop: asyncio.AbstractEventLoop, own: bool) -> None:
        self.owner = owner
        self.loop = loop
        self.lock = threading.Lock()
        #: Tasks to cancel at the loop's next turn (from other threads), or None
        #: when no such turn is scheduled.
        self.cancels: list[_Task] | None = None
        #: Thunks to start at the loop's next turn (``spawn_soon`` from other threads),
        #: and whether that turn is scheduled (no lock: see spawn_soon); and the tasks
        #: started so (the loop keeps only weak references to its tasks).
        self.soon: collections.deque[Callable[[], Awaitable[object]]] = collections.deque()
        self.waking = False
        self.soon_tasks: set[asyncio.Task[object]] = set()
        self.error: BaseException | None = None
        #: close() has stopped the loop (a SystemExit in the same turn must not undo it).
        self.stopping = False
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None
        self.ident = threading.get_ident()
        self.executor: _Executor | None = None
        if own:
            _OWN_LOOPS.add(id(loop))
            self.thread = threading.Thread(target=self._main, name=LOOP_THREAD_NAME, daemon=True)
            self.executor = _Executor()
            loop.set_default_executor(self.executor)

    @property
    def own(self) -> bool:
        """True for the manager's own loop, False for the application's."""
        return self.thread is not None

    def start(self) -> None:
        """Start the own loop's thread and return once the loop runs."""
        assert self.thread is not None
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            self.thread.join()
            raise RuntimeError(
                "weft-asyncio: the event loop thread failed to start"
            ) from self.error

    def _main(self) -> None:
        loop = self.loop
        self.ident = threading.get_ident()
        asyncio.set_event_loop(loop)
        try:
            loop.call_soon(self.ready.set)
            self._run_forever()
            # Stopped by close(): cancel what is left and let it end, then release it.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                self._run_until_done(asyncio.gather(*left, return_exceptions=True))
            self._run_until_done(loop.shutdown_asyncgens())
            self._abandon_executor()
        except BaseException as exc:  # a daemon thread has nobody to raise to
            self.error = exc
            if self.ready.is_set():
                log.critical("the asyncio loop thread crashed", exc_info=exc)
        finally:
            self.ready.set()
            asyncio.set_event_loop(None)
            loop.close()
            _OWN_LOOPS.discard(id(loop))

    def _run_forever(self) -> None:
        """Run the loop until close() stops it, whatever a task or a callback raises.

        asyncio raises a task's SystemExit or KeyboardInterrupt again out of
        ``run_forever()`` (after marking that task done): left there, it ended this
        thread and closed the loop under every other connection, destroyed pending.
        The task's own error is reported by its done callback; the loop goes on.
        """
        while True:
            try:
                self.loop.run_forever()
            except (SystemExit, KeyboardInterrupt) as exc:
                if self.stopping:  # close()'s stop came in the same turn: not lost
                    return
                _said_exit(exc, "the loop goes on")
                continue
            return

    def _run_until_done(self, work: Awaitable[object]) -> None:
        """Run the loop until ``work`` is done, whatever a task or a callback raises.

        A SystemExit from a callback queued in the turn of close()'s stop, or from a
        task as it is cancelled, came out of ``run_until_complete`` here as it did out
        of ``run_forever``: the thread took it for a crash, left the other tasks
        pending and the async generators unclosed (``shutdown_asyncgens()`` never
        awaited), and released the loop under them.
        """
        future = asyncio.ensure_future(work, loop=self.loop)  # started even if cut short
        while True:
            try:
                self.loop.run_until_complete(future)
            except (SystemExit, KeyboardInterrupt) as exc:
                _said_exit(exc, "its close goes on")
                if not future.done():
                    continue
            return

    def _abandon_executor(self) -> None:
        """Let the executor's calls that still run go on alone, and say so."""
        assert self.executor is not None
        running = self.executor.abandon()
        if running:
            log.warning(
                "%d call(s) still run in the asyncio loop's executor (asyncio.to_thread, "
                "run_in_executor) as its loop ends: not waited for; a call that blocks for "
                "good keeps its thread (weft serve exits within its bound regardless)",
                running,
            )

    def in_thread(self) -> bool:
        """True if the caller runs in this loop's thread."""
        return threading.get_ident() == self.ident

    def usable(self) -> bool:
        """False once the loop was closed (an application's loop whose run ended)."""
        return not self.loop.is_closed()

    def cancel_soon(self, task: _Task) -> None:
        """Cancel ``task`` on the loop; from another thread, batched with other cancels."""
        if self.in_thread():
            task.cancel_now()
            return
        with self.lock:
            if self.cancels is not None:
                self.cancels.append(task)
                return
            self.cancels = [task]
        try:
            self.loop.call_soon_threadsafe(self._cancel_batch)
        except RuntimeError:  # the loop is closed: its tasks have ended with it
            pass

    def _cancel_batch(self) -> None:
        with self.lock:
            batch, self.cancels = self.cancels or [], None
        for task in batch:
            task.cancel_now()

    def spawn_soon(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Start ``thunk()`` as a task of the loop; from another thread, batched.

        Only a call that finds no wake-up on its way wakes the loop (one
        ``call_soon_threadsafe``); the rest join that turn's batch. No lock, so that
        a signal handler calling ``submit()`` while its own thread was in here does
        not deadlock: ``deque.append`` and ``popleft`` are atomic, and a caller
        appends before it reads ``waking`` while the loop clears it before it
        drains, so a caller that sees a wake-up on its way is sure it takes its thunk.
        """
        if self.in_thread():
            self._start(thunk)
            return
        self.soon.append(thunk)
        if self.waking:
            return
        self.waking = True
        try:
            # In a context of its own: the calling thread's would be copied into
            # every task of the batch, its variables reaching other callers' calls.
            self.loop.call_soon_threadsafe(self._start_batch, context=contextvars.Context())
        except RuntimeError:  # the loop is closed
            self.soon.clear()
            self.waking = False
            raise RuntimeError(
                "weft-asyncio: the loop has ended (the server is not running)"
            ) from None

    def _start_batch(self) -> None:
        """Start what was queued before this turn (what comes meanwhile has a turn of its own)."""
        self.waking = False
        for _ in range(len(self.soon)):
            self._start(self.soon.popleft())

    def _start(self, thunk: Callable[[], Awaitable[object]]) -> None:
        task: asyncio.Task[object] = self.loop.create_task(thunk())  # type: ignore[arg-type]
        self.soon_tasks.add(task)
        task.add_done_callback(self.soon_tasks.discard)

    def close(self) -> None:
        """Stop the own loop (cancelling what is left) and join its thread; or let go."""
        if not self.own:
            return
        self.stopping = True
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            return
        if not self.in_thread():
            assert self.thread is not None
            self.thread.join(CLOSE_WAIT)
            if self.thread.is_alive():
                log.warning(
                    "the asyncio loop thread still runs %.0fs after its tasks were"
                    " cancelled: a task ignores its cancellation (or the loop is"
                    " blocked); it is left behind",
                    CLOSE_WAIT,
                )


def _said_exit(exc: BaseException, then: str) -> None:
    log.error(
        "%s was raised on the asyncio loop (by a task or a callback); only that one ended, %s",
        type(exc).__name__,
        then,
    )


class _Task(TaskState):
    """One task: its state, its loop and its ``asyncio.Task``.

    A TaskState itself rather than a record holding one: an object less per task.
    """

    __slots__ = ("home", "task")

    def __init__(self, task_id: Hashable, thunk: object, home: _Loop) -> None:
        super().__init__(task_id, getattr(thunk, "__name__", "") or f"weft task {task_id}")
        self.home = home
        #: Set on the loop when the task is created; None while it is queued.
        self.task: asyncio.Task[Any] | None = None

    def interrupt(self) -> bool:
        """Interrupt as TaskState does, and cancel the asyncio task; from any thread."""
        if not super().interrupt():
            return False
        self.home.cancel_soon(self)
        return True

    def cancel_now(self) -> None:
        """Cancel the task, on its loop. A task not created yet never will be."""
        task = self.task
        if task is not None and not task.done():
            task.cancel(CANCEL_MESSAGE)

    def finished(self, task: asyncio.Task[Any]) -> None:
        """The task's done callback: report an error, forget it, then mark it done."""
        try:
            if not task.cancelled():
                exc = task.exception()
                if exc is not None and not isinstance(exc, TaskShutdown):
                    log.error(
                        "task %s (%s) raised %s; other tasks go on",
                        self.id,
                        self.name,
                        type(exc).__name__,
                        exc_info=exc,
                    )
        finally:
            # Forgotten before done is set: once stop_task returns, the id is no
            # longer in all_tasks().
            self.home.owner._table.pop(self.id)
            self.task = None
            self.set_done()


class AsyncioManager:
    """An asyncio task per thunk, on the manager's own loop or the application's.

    Thunks are zero-argument callables returning an awaitable (``async def``
    handlers, bound with their arguments). ``limit`` caps how many tasks are held at
    once (``ManagerFullError`` beyond it). ``loop`` chooses the event loop the
    manager runs itself: ``"asyncio"`` or ``"uvloop"`` (``pip install
    'weft-asyncio[uvloop]'``); on an application's running loop, that loop serves,
    whatever it is. Each asyncio task is named after the thunk's ``__name__``.

    Resource handling: the manager's own loop thread starts at the first
    :meth:`add_task` made outside a running loop and ends at ``runtime.close()``,
    which cancels whatever still runs there.
    """

    def __init__(self, *, limit: int | None = None, loop: str = "asyncio") -> None:
        if loop not in LOOPS:
            raise ValueError(
                f"asyncio manager: loop must be one of {', '.join(map(repr, LOOPS))}, not {loop!r}"
            )
        if loop == "uvloop":
            try:
                importlib.import_module("uvloop")
            except ImportError:
                raise _uvloop_missing() from None
        self._loop_name = loop
        self._table: TaskTable[_Task] = TaskTable(limit, "asyncio manager")
        self._home: _Loop | None = None
        self._lock = threading.Lock()
        self._runtime = AsyncioRuntime(self)

    @property
    def limit(self) -> int | None:
        """The most tasks held at once (None: no limit)."""
        return self._table.limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._table.limit = value

    @property
    def runtime(self) -> AsyncioRuntime:
        """The asyncio runtime the server uses inside this manager's tasks."""
        return self._runtime

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the manager's tasks run on now, or None before its first task."""
        home = self._home
        return None if home is None else home.loop

    def __repr__(self) -> str:
        home = self._home
        where = "idle" if home is None else "own loop" if home.own else "application's loop"
        return (
            f"<AsyncioManager loop={self._loop_name} limit={self.limit} "
            f"tasks={len(self._table)} {where}>"
        )

    # -- the loop ------------------------------------------------------------------------

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop_name == "uvloop":
            # Through importlib: uvloop is an optional extra, absent where mypy runs.
            new: asyncio.AbstractEventLoop = importlib.import_module("uvloop").new_event_loop()
            return new
        return asyncio.new_event_loop()

    def _home_for_caller(self) -> _Loop:
        """The loop to run on: the current one, else the caller's running loop, else our own."""
        with self._lock:
            home = self._home
            if home is not None and home.usable():
                return home
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not None and id(running) not in _OWN_LOOPS:
                home = _Loop(self, running, own=False)
                self._check_loop_kind(running)
            else:
                home = _Loop(self, self._new_loop(), own=True)
                home.start()
            self._home = home
            return home

    def _check_loop_kind(self, running: asyncio.AbstractEventLoop) -> None:
        """Say so when ``loop="uvloop"`` was asked for and the application's loop is not.

        On an application's running loop, that loop serves, whatever ``loop`` says:
        a user who asked for uvloop would otherwise not know they did not get it.
        """
        kind = type(running).__module__
        if self._loop_name == "uvloop" and not kind.startswith("uvloop"):
            log.warning(
                "asyncio manager: loop='uvloop' was asked for, but the server runs on the "
                "application's running loop (%s.%s), which serves its connections: run the "
                "application under uvloop (uvloop.run(main())) to serve on uvloop",
                kind,
                type(running).__qualname__,
            )

    def close_loop(self) -> None:
        """End the own loop thread (cancelling what is left), or let go of the application's."""
        with self._lock:
            home, self._home = self._home, None
        if home is not None:
            home.close()

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` on the loop, if one runs; True once it has, False on timeout."""
        home = self._home
        if home is None or home.in_thread():
            fn()
            return True
        ran = threading.Event()

        def call() -> None:
            # A loop callback: an exception here would only be logged by asyncio.
            try:
                fn()
            except Exception:
                log.exception("%r failed on the asyncio loop", fn)
            finally:
                ran.set()

        try:
            home.loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop is closed: nothing runs there any more
            fn()
            return True
        return ran.wait(timeout)

    def spawn_soon(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Start ``thunk()`` soon as a plain task of the loop (``Server.submit``)."""
        home = self._home
        if home is None or not home.usable():
            raise RuntimeError("weft-asyncio: no loop runs (the server is not running)")
        home.spawn_soon(thunk)

    # -- adding ------------------------------------------------------------------------

    def add_task(self, thunk: Callable[[], Awaitable[object]]) -> Hashable:
        """Run ``thunk()`` as an asyncio task named after it, with the caller's contextvars.

        From the loop's own thread the task is created at once; from any other
        thread it is handed to the loop (started first if need be).
        """
        home = self._home
        here = home is not None and home.in_thread()
        if not here:
            home = self._home_for_caller()
            here = home.in_thread()
        assert home is not None
        state = self._table.add(_Task, thunk, home)
        try:
            context = contextvars.copy_context()
            if here:
                self._spawn(state, thunk, context)
            else:
                home.loop.call_soon_threadsafe(self._spawn, state, thunk, context)
        except BaseException:
            self._table.pop(state.id)
            raise
        return state.id

    def _spawn(
        self,
        state: _Task,
        thunk: Callable[[], Awaitable[object]],
        context: contextvars.Context,
    ) -> None:
        """Create the task on the loop, in ``context`` (the add_task caller's, copied)."""
        if state.interrupted:  # stopped before it started: it never runs
            self._table.pop(state.id)
            state.set_done()
            return
        try:
            context.run(state.make_current)
            coro: Any = context.run(thunk)
            loop = state.home.loop
            task: asyncio.Task[Any]
            if sys.version_info >= (3, 11):
                task = loop.create_task(coro, name=state.name, context=context)
            else:  # pragma: no cover - Python 3.10: create_task copies the current context
                task = context.run(lambda: loop.create_task(coro, name=state.name))
        except Exception as exc:
            log.error("task %s (%s) could not start", state.id, state.name, exc_info=exc)
            self._table.pop(state.id)
            state.set_done()
            return
        state.task = task
        task.add_done_callback(state.finished, context=context)

    # -- removing and stopping ---------------------------------------------------------

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task (it goes on running); True if it was there."""
        return self._table.pop(task_id)

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Ask the task to stop, cancel it after ``timeout``; return once it has ended.

        The flag (phase 2) sets the task's shutdown flag and runs its shutdown
        callbacks, then waits up to ``timeout`` seconds (None: forever). The interrupt
        (phase 3) cancels the task, then waits at most ``INTERRUPT_GRACE`` for it to
        end. Returns True if the task ended before it had to be interrupted, or was
        not held. Must not be called on the manager's loop (``RuntimeError``); await
        :meth:`astop_task` there.
        """
        state = self._table.get(task_id)
        if state is None:
            return True
        if state.home.in_thread():
            raise RuntimeError(_IN_LOOP_MESSAGE)
        state.request_shutdown()
        if state.done.wait(timeout):
            return True
        state.interrupt()
        if not state.done.wait(INTERRUPT_GRACE):
            log.debug(
                "task %s (%s) is still running %.1fs after it was cancelled: its loop is "
                "blocked, or it caught the cancellation; it is left to finish on its own",
                task_id,
                state.name,
                INTERRUPT_GRACE,
            )
        return False

    async def astop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """:meth:`stop_task` for asyncio code running on the manager's loop."""
        state = self._table.get(task_id)
        if state is None:
            return True
        if not state.home.in_thread():
            raise RuntimeError(
                "AsyncioManager.astop_task() must be awaited on the manager's own loop; "
                "from other threads call stop_task()"
            )
        state.request_shutdown()
        while state.task is None and not state.done.is_set():
            await asyncio.sleep(0)  # created at the loop's next turn
        task = state.task
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return True
        state.interrupt()
        await asyncio.wait({task}, timeout=INTERRUPT_GRACE)
        return False

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks held now (created or queued, not yet ended)."""
        return self._table.ids()
