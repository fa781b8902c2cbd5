"""``Server.submit``: run a function in the server's runtime from any thread.

The way to reply later, from elsewhere, to a parked connection (iomux-acceptor's
long-poll): a handler parks on an event or a queue of its runtime, and a thread
that has the answer calls ``server.submit(fn, *args)``; ``fn`` runs in the
runtime, where it may set that event or fill that queue, and the caller gets a
``concurrent.futures.Future`` with its result or exception. ``fn`` runs with the
caller's contextvars (iomux's saved specials), as a task of the runtime: inside it,
``current_task()`` is a TaskState whose shutdown is never requested (so that
``stop()`` called from ``fn`` knows not to block the loop it runs in), not the
caller's.

How ``fn`` gets into the runtime:

- A runtime with :meth:`~weft_core.SyncRuntime.spawn_soon` (gevent, trio, asyncio,
  threads) starts it as a light task of its own (a greenlet, a task of the
  manager's nursery or loop, an idle or new thread), which is none of the
  manager's tasks and never counts against its ``limit``. From a
  foreign thread the runtime batches: only the first call of a batch wakes its
  loop, which then starts everything queued meanwhile, so a publisher thread
  submitting to ten thousand subscribers wakes the loop a few times, not ten
  thousand.
- Any other runtime (third-party managers) gets it through the public
  ``TaskManager.add_task``: a task of the manager per call, with the contextvars
  the manager carries into every task.

Resource handling: futures still waiting to start when the server has stopped are
cancelled, and those whose call is still running then get a ServerError; one whose
``fn`` the runtime interrupts (a kill, a cancellation) gets a ServerError, and so
does one whose ``fn`` raised SystemExit or KeyboardInterrupt (the call ends, the
runtime goes on). A call still running once the stop's bound has passed (after the
runtime's close, which cancels what it can) is left behind, as a stuck connection
is: :meth:`Submitter.left_running` counts it for ``stats()["left_behind"]``.

Waiting on a Future in the runtime's own loop thread (a handler on unpatched gevent,
on trio or on asyncio calling ``result()``) would block the very loop that must run
the call, for good. The Future knows that thread (each call started by
``spawn_soon`` notes it): there, on a sync runtime, ``result()`` and ``exception()``
wait on a semaphore of the runtime (``runtime.slots(0)``: gevent's, cooperative),
and on an async runtime, where no plain call can wait without blocking the loop,
they raise RuntimeError saying what to do instead.

Signal safety: ``submit()`` may be called from a signal handler that interrupted
its own thread inside ``submit()`` (a SIGHUP handler publishing "reloading" while
the main thread publishes): the one lock here is re-entrant, and every runtime's
queue of calls takes its append without a lock.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ._blocking import BlockingRuntime
from ._errors import EXITS, ServerError
from ._protocol import SpawnsSoon, SyncRuntime, TaskManager
from ._tasks import TaskState, _current_task

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["Submitter"]

log = logging.getLogger("weft.server")

#: What ``current_task()`` is inside a call that ``submit()`` started with
#: ``spawn_soon`` (one shared state: nothing ever requests its shutdown).
#: How many functions' kinds a Submitter keeps before it forgets them all.
KINDS_KEPT = 256

SUBMITTED = TaskState("weft submit", "a call started by Server.submit()")

STOPPED_DURING_CALL = "the server stopped before the submitted call finished"

#: How long a stop with no timeout gives a submitted call still running once the
#: connections are done (a stop with one gives its own bound, timeout plus
#: STOP_GRACE): as long as STOP_GRACE, what a stuck connection gets once interrupted.
UNBOUNDED_STOP_WAIT = 2.0

#: What an async runtime's loop thread is told when it would block on a Future.
WAIT_IN_LOOP = (
    "{what}: this thread runs the {name} runtime's loop, which must run the submitted "
    "call, so waiting here would block every connection for good. The code here "
    "already runs in the server's runtime: call the function directly (await "
    "fn(*args)), or wait without blocking (asyncio: await asyncio.wrap_future(future))"
)


class Submitter:
    """One run's way into its runtime for ``Server.submit``; see the module docstring."""

    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        runtime = manager.runtime
        self.kind = runtime.kind
        self.spawn: Callable[[Callable[[], Any]], None] | None = (
            runtime.spawn_soon if isinstance(runtime, SpawnsSoon) else None
        )
        #: Why each function submitted so far cannot run here ("" if it can):
        #: inspecting one costs more than the rest of a submit. Bounded: a program
        #: submitting ever new closures only re-inspects them.
        self.kinds: dict[Any, str] = {}
        #: Futures handed out and not yet finished, failed by close().
        self.outstanding: set[Future[Any]] = set()
        #: Futures whose call has started and not yet ended, left behind if a stop
        #: outlasts them; and its condition, notified as the last one ends.
        self.running: set[Future[Any]] = set()
        #: Re-entrant: a signal handler calling submit() in a thread that is inside
        #: submit() (or close()) takes it again, where a plain lock deadlocked.
        self.lock = threading.RLock()
        self.calls_ended = threading.Condition(self.lock)
        self.closed = False
        #: The Future class, its module imported now (run() time), not by a first
        #: submit(), which a signal handler's submit() could interrupt mid-import.
        self.future_class = _future_class()
        #: The thread the runtime's loop runs in, noted by every call spawn_soon
        #: starts (threading's ident: on monkey-patched gevent, each greenlet's own).
        self.loop_ident: int | None = None

    def note_loop_thread(self) -> None:
        """Learn the loop's thread before any handler may wait on a Future there.

        Called once the server's acceptor is started (the loop runs); a runtime
        with no loop of its own (threads) has none to learn.
        """
        if self.spawn is None or isinstance(self.manager.runtime, BlockingRuntime):
            return

        def note() -> None:
            self.loop_ident = threading.get_ident()

        async def anote() -> None:
            note()

        assert self.spawn is not None
        try:
            self.spawn(anote if self.kind == "async" else note)
        except Exception:
            pass  # no loop yet: the first call notes it

    def remember(self, fn: Callable[..., Any], problem: str) -> str:
        """Note why ``fn`` cannot run here ("": it can) for the next submit of it; returns it."""
        if len(self.kinds) >= KINDS_KEPT:
            self.kinds.clear()
        try:
            self.kinds[fn] = problem
        except TypeError:
            pass  # unhashable after all (a partial of a list, say)
        return problem

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        """Start ``fn(*args)`` in the runtime; its future."""
        future: Future[Any] = self.future_class(self)
        spawn = self.spawn
        context = contextvars.copy_context() if spawn is not None else None
        if self.kind == "async":
            thunk: Callable[[], Any] = _async_thunk(self, future, context, fn, args)
        else:
            thunk = _sync_thunk(self, future, context, fn, args)
        with self.lock:
            if self.closed:
                raise ServerError("submit(): the server has stopped; run() it first")
            self.outstanding.add(future)
        try:
            if spawn is not None:
                spawn(thunk)
            else:
                # A task of the manager, named as managers name tasks.
                thunk.__name__ = f"weft submit {getattr(fn, '__qualname__', fn)!s}"
                self.manager.add_task(thunk)
        except BaseException as exc:
            self.outstanding.discard(future)
            raise ServerError(
                f"submit(): the {type(self.manager).__name__} runtime could not take "
                f"{getattr(fn, '__qualname__', fn)}: {exc}"
            ) from exc
        return future

    def started(self, future: Future[Any]) -> bool:
        """Mark ``future``'s call as running, from the runtime; False if it was cancelled."""
        if not future.set_running_or_notify_cancel():
            self.outstanding.discard(future)  # cancelled before it ran
            return False
        with self.lock:
            self.running.add(future)
        return True

    def ended(self, future: Future[Any]) -> None:
        """``future``'s call has ended (whatever its outcome); from the runtime."""
        self.outstanding.discard(future)
        with self.lock:
            self.running.discard(future)
            if not self.running:
                self.calls_ended.notify_all()

    def wait_here(self, future: Future[Any], timeout: float | None, what: str) -> float | None:
        """Before ``future.result(timeout)`` blocks: the timeout still to wait there.

        In the runtime's loop thread, a plain wait would keep the call from ever
        running: on a sync runtime the wait is done here on the runtime's own
        semaphore (cooperative on gevent) and 0 is returned; on an async one,
        RuntimeError. Anywhere else, ``timeout`` unchanged.
        """
        if future.done():
            return timeout
        if threading.get_ident() != self.loop_ident and not self._in_own_task():
            return timeout
        if self.kind == "async":
            raise RuntimeError(WAIT_IN_LOOP.format(what=what, name=type(self.manager).__name__))
        woken = cast(SyncRuntime, self.manager.runtime).slots(0)
        future.add_done_callback(lambda _: woken.release())
        woken.acquire(timeout=timeout)
        return 0

    def _in_own_task(self) -> bool:
        """True in a task of this server's manager on an evented runtime: its loop's thread.

        What tells the loop's thread before ``note_loop_thread``'s probe has run: a
        client accepted as the server started may wait on a Future first (a trio
        handler then blocked its loop for the whole wait, where it should have been
        told at once).
        """
        if self.loop_ident is not None or isinstance(self.manager.runtime, BlockingRuntime):
            return False
        state = _current_task.get()
        return state is not None and state.id in set(self.manager.all_tasks())

    def left_running(self, deadline: float | None) -> int:
        """After the stop: wait until ``deadline`` (monotonic) for calls still running; how many are left.

        ``None``: :data:`UNBOUNDED_STOP_WAIT` from now. Called once the runtime was
        closed (which cancelled what it could) or left running.
        """
        if deadline is None:
            deadline = time.monotonic() + UNBOUNDED_STOP_WAIT
        with self.lock:
            while self.running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.calls_ended.wait(left)
            return len(self.running)

    def close(self) -> None:
        """The server has stopped: settle every future still out; later submits fail.

        One that never started is cancelled. One whose call is still running (parked
        on an event the stop left it waiting for, or a call the stop left behind)
        gets a ServerError now, so that nobody waits on it for ever; should the call
        still finish, its result is dropped.
        """
        with self.lock:
            self.closed = True
            futures = list(self.outstanding)
            self.outstanding.clear()
        running = 0
        for future in futures:
            if not future.cancel():
                running += not future.done()
                _settle(future, error=ServerError(STOPPED_DURING_CALL))
        if running:
            # Not silent: the runtime's close (bounded, and warned of by itself) is such
            # a call's last chance; what still runs after the stop's bound is counted
            # as left behind (left_running).
            log.warning(
                "%d submit()ted call(s) still ran as the server stopped; their futures got "
                "ServerError. Closing the runtime cancels what it can; a call still "
                "running after the stop's bound is left behind",
                running,
            )


def _future_class() -> Callable[[Submitter], Future[Any]]:
    """The Future ``submit()`` returns, made on first use (concurrent.futures is heavy)."""
    global _SubmitFuture
    if _SubmitFuture is None:
        from concurrent.futures import Future

        class SubmitFuture(Future[Any]):
            """A Future that will not block the runtime's loop thread waiting on its own call."""

            def __init__(self, owner: Submitter) -> None:
                super().__init__()
                self._weft_owner = owner

            def result(self, timeout: float | None = None) -> Any:
                timeout = self._weft_owner.wait_here(self, timeout, "future.result()")
                return super().result(timeout)

            def exception(self, timeout: float | None = None) -> BaseException | None:
                timeout = self._weft_owner.wait_here(self, timeout, "future.exception()")
                return super().exception(timeout)

        _SubmitFuture = SubmitFuture
    return _SubmitFuture


_SubmitFuture: Callable[[Submitter], Future[Any]] | None = None


def _returned_unrun(fn: Callable[..., Any], returned: Any) -> TypeError | None:
    """The error for a plain ``fn`` that returned a generator or a coroutine, which nobody runs.

    ``submit()`` refuses generator functions and, on a sync manager, an ``async
    def``; a plain decorator over one hides it until it is called (as for
    handlers: docs/api.md).
    """
    name = getattr(fn, "__qualname__", fn)
    if inspect.isgenerator(returned):
        returned.close()
        return TypeError(
            f"submit({name}): it returned a generator, whose body never ran: it is a"
            " generator function (a def with yield, maybe behind a decorator); drop the yield"
        )
    if inspect.isawaitable(returned):
        close = getattr(returned, "close", None)
        if close is not None:
            close()  # no "never awaited" warning: the error says it
        return TypeError(
            f"submit({name}): it returned {type(returned).__name__}, which nobody awaits: it"
            " is an async def behind a plain function (a decorator?), and this manager runs"
            " plain functions; submit a plain function"
        )
    return None


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    from concurrent.futures import InvalidStateError

    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # settled already (cancelled, or abandoned by a stop)


def _exited(exc: BaseException) -> ServerError:
    """The error a future gets for a call that raised SystemExit or KeyboardInterrupt.

    Not the exception itself: ``result()`` would raise it in the caller's thread,
    ending that program for a call that ran elsewhere.
    """
    error = ServerError(f"the submitted call raised {exc!r}")
    error.__cause__ = exc
    return error


def _outside_tasks(context: contextvars.Context | None) -> None:
    """Enter ``context``'s variables, as a submitted call (set in the running context)."""
    if context is not None:
        for var, value in context.items():
            var.set(value)
        _current_task.set(SUBMITTED)


def _sync_thunk(
    owner: Submitter,
    future: Future[Any],
    context: contextvars.Context | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> Callable[[], None]:
    def run_submitted() -> None:
        if not owner.started(future):
            return
        if context is not None:
            owner.loop_ident = threading.get_ident()
        try:
            result = fn(*args) if context is None else context.run(_call_sync, fn, args)
            unrun = _returned_unrun(fn, result)
            if unrun is not None:
                raise unrun
        except Exception as exc:
            _settle(future, error=exc)
        except EXITS as exc:
            _settle(future, error=_exited(exc))
        except BaseException as exc:  # the runtime ends it (a kill): tell, then let it end
            _settle(future, error=ServerError(f"the submitted call was interrupted: {exc!r}"))
            raise
        else:
            _settle(future, result)
        finally:
            owner.ended(future)

    return run_submitted


def _call_sync(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    _current_task.set(SUBMITTED)
    return fn(*args)


def _async_thunk(
    owner: Submitter,
    future: Future[Any],
    context: contextvars.Context | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> Callable[[], Any]:
    async def run_submitted() -> None:
        if not owner.started(future):
            return
        if context is not None:
            owner.loop_ident = threading.get_ident()
        _outside_tasks(context)
        try:
            result = await fn(*args)
        except Exception as exc:
            _settle(future, error=exc)
        except EXITS as exc:
            _settle(future, error=_exited(exc))
        except BaseException as exc:  # the runtime's cancellation: tell, then let it end
            _settle(future, error=ServerError(f"the submitted call was interrupted: {exc!r}"))
            raise
        else:
            _settle(future, result)
        finally:
            owner.ended(future)

    return run_submitted
