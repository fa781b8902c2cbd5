"""The TaskManager protocol (Weft's, made Pythonic) and the Runtime a manager serves with.

A task manager owns concurrency: it runs thunks as tasks and can stop them. The
server owns networking: it binds, accepts and hands each connection to the manager
as a thunk. The two meet in :class:`Runtime`, the handful of runtime-native
operations (adopt a listening socket, wait on a semaphore, close a connection) that
let one accept loop and one connection wrapper, written once in ``weft_core``, run
inside any manager's runtime.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ._spec import HandlerKind

if TYPE_CHECKING:
    import ssl

T = TypeVar("T")

__all__ = [
    "AsyncRuntime",
    "AsyncSlots",
    "Runtime",
    "Slots",
    "SpawnsSoon",
    "SyncRuntime",
    "SyncSlots",
    "TaskManager",
    "check_runtime",
    "manager_problem",
    "protocol_members",
]


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

        Returns True if it ended before it had to be interrupted, and at once for
        an id the manager does not hold (ended already, or never its own).
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
    """What every runtime has, sync or async; see :class:`SyncRuntime` and :class:`AsyncRuntime`.

    Which thread calls what: ``adopt_listener`` and ``slots`` the thread that calls
    ``Server.run()``; ``run_in_loop`` and ``close`` the thread that stops the server;
    ``wake_listener`` whichever thread sets the acceptor's shutdown flag (the stop's,
    or the loop's inside ``stop_task``); everything else the manager's tasks (the
    acceptor task, or a connection's task).
    """

    #: ``"sync"``: handlers are plain functions; ``"async"``: ``async def``.
    kind: HandlerKind
    #: True if the connection handed to handlers is already a stream, so that
    #: ``Server(stream=True)`` makes no sense and is refused.
    conn_is_stream: bool
    #: The exception types the runtime cancels a task with (trio's ``Cancelled``,
    #: asyncio's ``CancelledError``, gevent's ``GreenletExit``; ``()`` where nothing
    #: cancels a task, as on threads). One of them (or a group of only them and
    #: ``TaskShutdown``) leaving a handler ends its task as the runtime's doing,
    #: passed on to the manager; any other exception, a cancellation of another
    #: runtime's included, is the handler's failure (counted, its messages escaped in
    #: the log). Optional: a runtime without it (None) has every class named
    #: ``Cancelled``, ``CancelledError`` or ``GreenletExit`` counted as its own.
    cancellations: tuple[type[BaseException], ...] | None = None

    def adopt_listener(self, sock: socket.socket) -> Any:
        """Return the runtime's own listening socket for a bound, listening ``sock``.

        Takes ownership: afterwards the server only uses the returned object. The
        acceptor task calls ``accept()`` on it (awaited for an async runtime), which
        returns ``(sock, address)`` and raises OSError on failure; the server also
        calls ``fileno()``, ``getsockname()``, ``getsockopt()`` and ``family`` on it, and
        ``close()``, from the acceptor task or the stopping thread, possibly twice.
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

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the thread of the runtime's loop; True once it has run there.

        False if the loop did not run it within ``timeout`` seconds (None: no limit);
        it may still run later, so ``fn`` must be idempotent. A stop ends every
        connection's input in one batch (``shutdown(SHUT_RD)`` on each socket, and
        each task's shutdown flag). Made from the stopping thread, each of those
        calls would hand the GIL back and forth with a loop thread already waking the
        connections the previous calls ended; made in the loop's thread, the batch
        runs in one go, then the loop wakes them. ``fn`` does not block and does not
        raise. A loop that does not take it within ``timeout`` is blocked by a task;
        the stop then runs ``fn`` in its own thread and goes on.

        The default, which a runtime gets by subclassing this protocol, runs ``fn``
        in the calling thread and returns True: right for runtimes without a loop
        thread (threads).
        """
        fn()
        return True

    def close(self) -> None:
        """Release what the runtime holds (a loop thread, a hub); idle runtimes may reopen.

        The server calls it once it has stopped, for a manager it made from a name:
        every connection's handler has returned by then, but a task may still be on
        its way out of the manager (after its thunk returned). After a stop that left
        tasks behind (``stats()["left_behind"]``) it is not called: closing would wait
        for them.
        """
        ...


class SyncRuntime(_RuntimeBase, Protocol):
    """A runtime whose handlers are plain functions (threads, gevent, thread pools).

    What the server does with the sockets it gets (each call in a task of the
    manager unless said otherwise):

    - on the listener from :meth:`adopt_listener`: ``accept()`` in the acceptor
      task, returning ``(sock, address)``; OSError for a failure (``EMFILE`` makes
      the acceptor back off with :meth:`sleep`, any error once the acceptor was
      asked to stop ends it);
    - on an accepted ``sock``, in its connection's task: ``setsockopt``,
      ``settimeout``, ``getsockname``, ``recv`` (a PROXY header), then
      :meth:`wrap_tls` and :meth:`wrap_connection`; ``close()`` at the end;
    - from outside its task: ``shutdown(SHUT_RD)`` in phase 2 of a stop (through
      :meth:`run_in_loop`, or in the stopping thread if the loop does not answer),
      ``shutdown(SHUT_RDWR)`` in phase 3 from the stopping thread (on the raw socket
      :meth:`wrap_tls` returned, under TLS), and ``close()`` for a connection whose
      task never ran.
    """

    def slots(self, n: int) -> SyncSlots:
        """A semaphore of ``n`` slots (``max_connections``).

        The acceptor acquires; a connection's task releases as it ends, or the
        stopping thread does for a connection whose task never ran.
        """
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling task for ``seconds`` (the acceptor's back-off)."""
        ...

    def wrap_connection(self, sock: Any) -> Any:
        """The object the handler receives for an accepted native socket.

        ``Server(stream=True)`` calls ``makefile("rwb")`` on it; the server calls
        ``close()`` on it when the handler returns (unless it was detached).
        """
        ...

    def wrap_tls(self, sock: Any, context: ssl.SSLContext) -> tuple[Any, Any]:
        """A server-side TLS socket over ``sock``, not yet handshaken, and its raw socket.

        The TLS socket must support ``settimeout``, ``do_handshake``, ``version``,
        ``cipher`` and ``getpeercert``; the second item shuts the descriptor down
        (``shutdown(how)``) from any thread without disturbing TLS state, and raises
        OSError once the descriptor is closed. Its reads should give ``b""`` for an
        end of input, with close_notify or without, but raise ``ConnectionError`` for
        a reset: the stdlib's ``ssl`` reports both as an end (``BLOCKING_RUNTIME``'s
        sockets ask the kernel which it was).
        """
        ...


class AsyncRuntime(_RuntimeBase, Protocol):
    """A runtime whose handlers are ``async def`` (trio, asyncio).

    What the server does with the sockets it gets (each call in a task of the
    manager unless said otherwise):

    - on the listener from :meth:`adopt_listener`: ``await accept()`` in the
      acceptor task, returning ``(sock, address)``; OSError for a failure;
    - on an accepted ``sock``, in its connection's task: ``setsockopt``,
      ``getsockname``, ``family``, ``await recv(n)`` (a PROXY header, within
      :meth:`within`), then :meth:`wrap_connection` and :meth:`wrap_tls`; at the
      end :meth:`aclose` on the stream, or ``close()`` on ``sock`` if no stream was
      made;
    - from outside its task: ``shutdown(SHUT_RD)`` on ``sock`` in phase 2 of a stop
      (through :meth:`run_in_loop`, or in the stopping thread if the loop does not
      answer), ``shutdown(SHUT_RDWR)`` in phase 3 from the stopping thread, and
      ``close()`` for a connection whose task never ran.
    """

    def slots(self, n: int) -> AsyncSlots:
        """A semaphore of ``n`` slots (``max_connections``); see :meth:`SyncRuntime.slots`."""
        ...

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Suspend the calling task for ``seconds`` (the acceptor's back-off)."""
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
        """A server-side TLS stream over ``stream``.

        It has an awaitable ``do_handshake()`` and, once handshaken, ``version()``,
        ``cipher()`` and ``getpeercert()`` as an ``ssl.SSLObject`` has.
        """
        ...

    def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """``await fn()``, raising ``TimeoutError`` after ``seconds``."""
        ...

    def aclose(self, conn: Any) -> Awaitable[None]:
        """Close what :meth:`wrap_connection` or :meth:`wrap_tls` returned."""
        ...


@runtime_checkable
class SpawnsSoon(Protocol):
    """An optional member of a runtime: start light tasks from any thread, for ``Server.submit``.

    Not required: a runtime without it still gets ``submit()``, through its
    manager's ``add_task`` (a task of the manager per call). With it, ``submit()``
    costs a queue append and, once per batch, a wake-up of the runtime's loop.
    """

    def spawn_soon(self, thunk: Callable[[], Any]) -> None:
        """Start ``thunk`` soon as a task of the runtime; from any thread, never waiting.

        ``thunk`` is a plain function on a sync runtime (it may block
        cooperatively: give it a greenlet of its own) and an ``async def`` on an
        async one (a task, e.g. in the manager's nursery). It is not one of the
        manager's tasks: no id, no limit, not in ``all_tasks()``. It handles its
        own exceptions (only the runtime's own interruption may escape). From a
        foreign thread, queue it and wake the loop once per batch (the first call
        after the loop last emptied the queue); from the loop's own thread, start
        it at once. A runtime that has stopped may drop it: the server cancels
        whatever never started.
        """
        ...


Runtime = SyncRuntime | AsyncRuntime

#: The protocol each handler kind's runtime follows.
_PROTOCOLS: dict[str, type] = {"sync": SyncRuntime, "async": AsyncRuntime}


def _protocol_classes(protocol: type) -> list[type]:
    """``protocol`` and the protocol classes it extends, the most basic first."""
    return [
        cls
        for cls in reversed(protocol.__mro__)
        if cls not in (object, Protocol) and cls.__module__ != "typing"
    ]


def _declared_methods(protocol: type) -> dict[str, object]:
    """The methods and properties ``protocol`` declares, by name, as its classes define them."""
    methods: dict[str, object] = {}
    for cls in _protocol_classes(protocol):
        methods.update(
            (n, v) for n, v in vars(cls).items() if callable(v) or isinstance(v, property)
        )
    return methods


def protocol_members(protocol: type) -> list[str]:
    """The members a protocol class declares (its own and its bases'), sorted."""
    names = set(_declared_methods(protocol))
    for cls in _protocol_classes(protocol):
        names.update(getattr(cls, "__annotations__", {}))
    return sorted(n for n in names if not n.startswith("_"))


#: Protocol methods with a body that works as it is: a class that subclasses the
#: protocol may inherit them. Every other protocol method is a declaration (``...``).
_DEFAULTS = frozenset({"run_in_loop"})
#: Protocol members a runtime may leave out (its getattr default is the protocol's).
_OPTIONAL = frozenset({"cancellations"})


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, or only inherits as declarations.

    A class that subclasses a protocol explicitly (as the docs suggest for runtimes)
    inherits each method's ``...`` body: ``hasattr`` finds it, and it returns None
    when called, so a forgotten ``slots`` would silently mean no connection limit.
    Such a member counts as missing.
    """
    stubs = _declared_methods(protocol)
    missing = []
    for name in protocol_members(protocol):
        if name in _OPTIONAL:
            continue
        if not hasattr(obj, name):
            missing.append(name)
        elif name in stubs and name not in _DEFAULTS:
            found = inspect.getattr_static(obj, name, None)
            if found is stubs[name]:
                missing.append(name)
    return missing


def _runtime_problem(runtime: object) -> str | None:
    """Why ``runtime`` is not a runtime, as "lacks a, b (see weft_core.X)", or None."""
    kind = getattr(runtime, "kind", None)
    if kind not in _PROTOCOLS:
        return (
            f"has kind={kind!r}, expected 'sync' or 'async' "
            "(see weft_core.SyncRuntime and weft_core.AsyncRuntime)"
        )
    protocol = _PROTOCOLS[kind]
    missing = missing_members(runtime, protocol)
    if missing:
        return f"lacks {', '.join(missing)} (see weft_core.{protocol.__name__})"
    own = getattr(runtime, "cancellations", None)
    if own is not None and not (
        isinstance(own, tuple)
        and all(isinstance(c, type) and issubclass(c, BaseException) for c in own)
    ):
        return (
            f"has cancellations={own!r}, expected a tuple of exception classes, or None "
            f"(see weft_core.{protocol.__name__})"
        )
    return None


def check_runtime(runtime: object) -> None:
    """Check that ``runtime`` has every member its kind's protocol declares.

    Raises TypeError naming what is missing and the protocol to read, e.g. "runtime
    <MyRuntime> lacks wrap_tls, run_in_loop (see weft_core.AsyncRuntime)".
    ``create_manager`` and ``Server`` call it when the manager is made, so that a
    runtime missing a member fails there and not deep inside the accept loop. A
    runtime that subclasses :class:`SyncRuntime` or :class:`AsyncRuntime` gets the
    default :meth:`~SyncRuntime.run_in_loop`; every other method it must define
    itself (the protocol's own is only a declaration, and counts as missing).
    """
    problem = _runtime_problem(runtime)
    if problem is not None:
        raise TypeError(f"runtime {runtime!r} {problem}")


def manager_problem(manager: object) -> str | None:
    """Why ``manager`` cannot serve, in a phrase ("lacks add_task", "its runtime lacks ..."), or None."""
    missing = missing_members(manager, TaskManager)
    if missing:
        return f"lacks {', '.join(missing)} (see weft_core.TaskManager)"
    problem = _runtime_problem(manager.runtime)  # type: ignore[attr-defined]
    return None if problem is None else f"its runtime {problem}"
