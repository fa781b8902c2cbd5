"""The TaskManager protocol (Weft's, made Pythonic) and the Runtime a manager serves with.

A task manager owns concurrency: it runs thunks as tasks and can stop them. The
server owns networking: it binds, accepts and hands each connection to the manager
as a thunk. The two meet in :class:`Runtime`, the handful of runtime-native
operations (adopt a listening socket, wait on a semaphore, close a connection) that
let one accept loop and one connection wrapper, written once in ``weft_core``, run
inside any manager's runtime.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ._spec import HandlerKind

if TYPE_CHECKING:
    import ssl

T = TypeVar("T")

__all__ = ["AsyncRuntime", "Runtime", "Slots", "SyncRuntime", "TaskManager"]


@runtime_checkable
class TaskManager(Protocol):
    """What the server needs of a task manager.

    Ids are unique for the manager's life. ``add_task`` need not start the thunk at
    once but must at least queue it; at ``limit`` it raises
    :class:`~weft_core.ManagerFullError`. Inside a task,
    :func:`~weft_core.shutdown_requested` becomes true when the task should stop, and
    a task may raise :class:`~weft_core.TaskShutdown` to end at once. A task that
    raises anything else is reported and removed; the manager goes on.

    ``runtime`` is the one addition to Weft's protocol: it tells the server what kind
    of handler the manager runs and how to do I/O there (see :class:`Runtime`).
    """

    limit: int | None

    @property
    def runtime(self) -> Runtime:
        """The runtime this manager's tasks run in."""
        ...

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        """Run (or queue) ``thunk`` as a task and return its id."""
        ...

    def remove_task(self, task_id: Hashable) -> bool:
        """Forget the task; True if it was there. Does not stop it."""
        ...

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Ask the task to stop, interrupt it after ``timeout``; return once it stopped.

        Returns True if it ended before it had to be interrupted.
        """
        ...

    def all_tasks(self) -> list[Hashable]:
        """Ids of the tasks the manager holds now."""
        ...


class Slots(Protocol):
    """A counting semaphore native to a runtime (connection slots)."""

    def release(self) -> None:
        """Free one slot; callable from any task of the runtime."""
        ...


class SyncSlots(Slots, Protocol):
    """Slots whose ``acquire`` blocks the calling task."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a slot, waiting up to ``timeout`` if ``blocking``; True if taken."""
        ...


class AsyncSlots(Slots, Protocol):
    """Slots whose ``acquire`` is awaited."""

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free; True if taken."""
        ...

    def acquire_within(self, timeout: float | None) -> Awaitable[bool]:
        """Wait up to ``timeout`` seconds (None: forever) for a slot; True if taken."""
        ...


class _RuntimeBase(Protocol):
    kind: HandlerKind
    #: True if the connection handed to handlers is already a stream, so that
    #: ``Server(stream=True)`` makes no sense and is refused.
    conn_is_stream: bool

    def adopt_listener(self, sock: socket.socket) -> Any:
        """Return the runtime's own listening socket for a bound, listening ``sock``.

        Takes ownership: afterwards the server only uses the returned object.
        """
        ...

    def wake_listener(self, listener: Any) -> None:
        """Make a task waiting in ``listener.accept()`` return soon; called from any thread.

        A runtime whose manager interrupts tasks itself (gevent kills, trio cancels)
        may do nothing: the server stops acceptors with ``stop_task(id, 0)``. A
        thread-based runtime must wake the thread (see ``WakeableListener``). Never
        ``shutdown()`` the listener: other processes may share it.
        """
        ...

    def close(self) -> None:
        """Release what the runtime holds (a loop thread, a hub); idle runtimes may reopen."""
        ...

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the thread of the runtime's loop; True once it has run there.

        False if the loop did not run it within ``timeout`` seconds (None: no limit);
        it may still run later. A stop ends every connection's input in one batch
        (``shutdown(SHUT_RD)`` on each socket): made from the stopping thread, each
        call would hand the GIL back and forth with a loop thread already waking the
        connections the previous calls ended; in the loop's thread the batch runs in
        one go. ``fn`` does not block. A runtime without a loop thread of its own
        (threads) calls ``fn()`` at once and returns True.
        """
        ...


class SyncRuntime(_RuntimeBase, Protocol):
    """A runtime whose handlers are plain functions (threads, gevent, thread pools)."""

    def slots(self, n: int) -> SyncSlots:
        """A semaphore of ``n`` slots."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling task for ``seconds``."""
        ...

    def wrap_connection(self, sock: Any) -> Any:
        """The object the handler receives for an accepted native socket."""
        ...

    def wrap_tls(self, sock: Any, context: ssl.SSLContext) -> tuple[Any, Any]:
        """A server-side TLS socket over ``sock``, not yet handshaken, and its raw socket.

        The TLS socket must support ``settimeout`` and ``do_handshake``; the second
        item shuts the descriptor down (``shutdown(how)``) from any thread without
        disturbing TLS state, and raises OSError once the descriptor is closed.
        """
        ...


class AsyncRuntime(_RuntimeBase, Protocol):
    """A runtime whose handlers are ``async def`` (trio)."""

    def slots(self, n: int) -> AsyncSlots:
        """A semaphore of ``n`` slots."""
        ...

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Suspend the calling task for ``seconds``."""
        ...

    #: Exception types a failed TLS handshake raises besides OSError and ValueError.
    tls_errors: tuple[type[BaseException], ...]

    def wrap_connection(self, sock: Any, idle_timeout: float | None = None) -> Any:
        """The stream the handler receives for an accepted native socket.

        With ``idle_timeout``, receiving raises ``TimeoutError`` after that many
        seconds without data.
        """
        ...

    def wrap_tls(self, stream: Any, context: ssl.SSLContext) -> Any:
        """A server-side TLS stream over ``stream``, with an awaitable ``do_handshake``."""
        ...

    def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """``await fn()``, raising ``TimeoutError`` after ``seconds``."""
        ...

    def aclose(self, conn: Any) -> Awaitable[None]:
        """Close what :meth:`wrap_connection` returned."""
        ...


Runtime = SyncRuntime | AsyncRuntime
