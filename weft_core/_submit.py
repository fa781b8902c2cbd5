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

- A runtime with :meth:`~weft_core.SyncRuntime.spawn_soon` (gevent, trio) starts it
  as a light task of its own (a greenlet, a task of the manager's nursery). From a
  foreign thread the runtime batches: only the first call of a batch wakes its
  loop, which then starts everything queued meanwhile, so a publisher thread
  submitting to ten thousand subscribers wakes the loop a few times, not ten
  thousand.
- Any other runtime (threads, third-party managers) gets it through the public
  ``TaskManager.add_task``: a task of the manager per call (on ``threads``, a new
  thread per call), with the contextvars the manager carries into every task.

Resource handling: futures still waiting to start when the server has stopped are
cancelled, and those whose call is still running then get a ServerError; one whose
``fn`` the runtime interrupts (a kill, a cancellation) gets a ServerError, and so
does one whose ``fn`` raised SystemExit or KeyboardInterrupt (the call ends, the
runtime goes on).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import EXITS, ServerError
from ._protocol import SpawnsSoon, TaskManager
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


class Submitter:
    """One run's way into its runtime for ``Server.submit``; see the module docstring."""

    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        runtime = manager.runtime
        self.kind = runtime.kind
        self.spawn: Callable[[Callable[[], Any]], None] | None = (
            runtime.spawn_soon if isinstance(runtime, SpawnsSoon) else None
        )
        #: The kind (sync, async) of functions submitted so far: inspecting one costs
        #: more than the rest of a submit. Bounded: a program submitting ever new
        #: closures only re-inspects them.
        self.kinds: dict[Any, str] = {}
        #: Futures handed out and not yet finished, failed by close().
        self.outstanding: set[Future[Any]] = set()
        self.lock = threading.Lock()
        self.closed = False

    def remember(self, fn: Callable[..., Any], kind: str) -> str:
        """Note ``fn``'s kind for the next submit of it; returns ``kind``."""
        if len(self.kinds) >= KINDS_KEPT:
            self.kinds.clear()
        try:
            self.kinds[fn] = kind
        except TypeError:
            pass  # unhashable after all (a partial of a list, say)
        return kind

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        """Start ``fn(*args)`` in the runtime; its future."""
        from concurrent.futures import Future  # not at import: weft_core imports nothing heavy

        future: Future[Any] = Future()
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
            # Not silent: on threads nothing can end such a call, and on a loop the
            # runtime's close (bounded, and warned of by itself) is its last chance.
            log.warning(
                "%d submit()ted call(s) still ran as the server stopped; their futures got "
                "ServerError. Closing the runtime cancels what it can; on threads such a "
                "call goes on in the background",
                running,
            )


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
        if not future.set_running_or_notify_cancel():
            owner.outstanding.discard(future)  # cancelled before it ran
            return
        try:
            result = fn(*args) if context is None else context.run(_call_sync, fn, args)
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
            owner.outstanding.discard(future)

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
        if not future.set_running_or_notify_cancel():
            owner.outstanding.discard(future)  # cancelled before it ran
            return
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
            owner.outstanding.discard(future)

    return run_submitted
