"""The Server: Weft's ``server`` class, with Sagittarius' and LispWorks' options.

The Server checks its settings when it is made, opens its listeners in ``run()``
(so a bind error reaches the caller), and hands the running machinery to an
:class:`~weft_core._engine.Engine`. ``stop()`` is a graceful stop in three phases,
the same on every manager:

1. close the listeners (new clients are refused at once);
2. flag every connection's task and end its input (``shutdown(SHUT_RD)``), so a
   handler waiting for its client's next bytes returns, while one in the middle of
   a reply can finish writing it;
3. when ``timeout`` runs out, interrupt what is left, all at once: shut each
   socket down for reading and writing and interrupt each task (gevent kills, trio
   cancels; a thread has been woken by its socket), then wait for them all against
   one deadline, ``timeout`` plus ``STOP_GRACE``; what still runs then is left
   behind, counted in ``stats()["left_behind"]``.

``stop()`` and ``stop_accepting()`` may be called from anywhere: from inside one of
weft's tasks (a handler, a hook called by the acceptor), or from a coroutine on a
running asyncio loop (which may be the very loop serving the connections), they
cannot wait, since the caller's own task is part of what stops and an event loop
must not be blocked, so they start the work in a thread of their own and return at
once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar, overload

from ._endpoints import listen_endpoints
from ._engine import (
    COUNTERS,
    DURATION_BUCKETS,
    LOOP_WAIT,
    STOP_GRACE,
    Engine,
    StopReport,
    call_within,
    cumulative,
)
from ._engine_async import AsyncEngine
from ._engine_sync import SyncEngine
from ._errors import (
    EXITS,
    ConfigError,
    HandlerKindError,
    ServerError,
    UnknownManagerError,
    WeftError,
)
from ._listeners import Family, open_listeners
from ._logsafe import log_untrusted_exception
from ._osthreads import one_cpu, short_switches
from ._protocol import AsyncRuntime, SyncRuntime, TaskManager, manager_problem
from ._proxy import DEFAULT_TRUSTED_PROXIES
from ._registry import DEFAULT_MANAGER, available_managers, create_manager, hooks
from ._settings import (
    Callback,
    ExceptionHandler,
    OnFull,
    Settings,
    names_a_unix_socket,
    validate,
)
from ._shutdown_port import ShutdownHandler, ShutdownPort
from ._spec import HandlerKind
from ._submit import Submitter
from ._tasks import current_task

if TYPE_CHECKING:
    import ssl
    from concurrent.futures import Future

    from ._control import ConnectionSnapshot

__all__ = ["DEFAULT_MANAGER", "DEFAULT_MAX_CONNECTIONS", "Server"]

log = logging.getLogger("weft.server")

_T = TypeVar("_T")

#: The server whose ``on_stop`` or ``weft_server_stopped`` hooks this thread runs:
#: a ``stop()`` from there must not wait for the stop that is running it.
_finisher = threading.local()

#: The least time a stop gives its runtime to close, and the plugins' server-stopped
#: hooks to run, even when the stop's own bound is already spent: both take
#: milliseconds when nothing is stuck.
CLOSE_FLOOR = 0.2

#: ranch's default: a flood of clients must not create unbounded threads.
DEFAULT_MAX_CONNECTIONS = 1024
#: LispWorks' and gunicorn's default listen backlog (the kernel caps it at somaxconn).
DEFAULT_BACKLOG = 1024
#: Grace given to open connections when the server stops itself on a fatal accept error.
FATAL_STOP_TIMEOUT = 10.0

#: After a stop that left stuck tasks behind, how often a thread looks whether they
#: have ended, to close the runtime they held open: at first, then doubling to at most
#: the second figure (a task stuck for good costs a wake-up a second).
RUNTIME_IDLE_POLL = 0.05
RUNTIME_IDLE_POLL_MOST = 1.0
#: How long that close may take (the stuck tasks have ended: it is quick).
RUNTIME_IDLE_CLOSE = 5.0


def handler_kind(handler: Callable[..., Any]) -> HandlerKind:
    """``"async"`` for an ``async def`` (or a partial or object wrapping one), else ``"sync"``."""
    target = _unpartial(handler)
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - instances with async __call__
    ):
        return "async"
    return "sync"


def _unpartial(handler: Callable[..., Any]) -> Any:
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    return target


def _wraps_async(handler: Callable[..., Any]) -> bool:
    """True for a plain function that decorates an ``async def`` (``functools.wraps``).

    Such a wrapper returns the coroutine of the function it wraps, as a plain
    decorator does; ``asyncio.start_server`` takes it, and so do the async managers.
    """
    try:
        inner = inspect.unwrap(_unpartial(handler))
    except ValueError:  # a __wrapped__ cycle
        return False
    return inner is not handler and inspect.iscoroutinefunction(inner)


def _describe(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", None)
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}:{name}" if module else name


class Server:
    """A TCP (or Unix socket) server whose connections run on a pluggable task manager.

    ``handler(conn, *args)`` is called for each connection, with ``conn`` native to
    the manager: a socket for ``threads``, a gevent socket for ``gevent``, a
    ``trio.SocketStream`` for ``trio``. docs/api.md has every keyword and call.

    Error handling: a handler's exception goes to ``exception_handler`` (default: log
    it with the peer and traceback) and never reaches the acceptor or another
    connection. A bind error is raised by :meth:`run` naming the address and port.
    """

    def __init__(
        self,
        handler: Callable[..., Any],
        *,
        address: str = "127.0.0.1",
        port: int | str = 0,
        args: Sequence[Any] = (),
        manager: str | TaskManager | None = None,
        manager_options: dict[str, Any] | None = None,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        full_wait: float = 0,
        on_full: OnFull = "refuse",
        backlog: int = DEFAULT_BACKLOG,
        nodelay: bool = True,
        keepalive: bool = False,
        reuse_port: bool = False,
        family: Family = "auto",
        idle_timeout: float | None = None,
        stream: bool = False,
        exception_handler: ExceptionHandler | None = None,
        on_start: Callback | None = None,
        on_stop: Callback | None = None,
        bind: str | Iterable[str] | None = None,
        unix_mode: int | None = None,
        tls: ssl.SSLContext | Mapping[str, Any] | Literal[False] | None = None,
        tls_handshake_timeout: float = 10.0,
        proxy_protocol: bool = False,
        trusted_proxies: Sequence[str] = DEFAULT_TRUSTED_PROXIES,
        proxy_header_timeout: float = 5.0,
        shutdown_port: int | None = None,
        shutdown_secret: str | None = None,
        shutdown_handler: ShutdownHandler | None = None,
        shutdown_allow_no_secret: bool = False,
        access_log: bool = False,
    ) -> None:
        self._cfg = Settings.from_keywords(
            handler,
            address=address,
            port=port,
            args=args,
            max_connections=max_connections,
            full_wait=full_wait,
            on_full=on_full,
            backlog=backlog,
            nodelay=nodelay,
            keepalive=keepalive,
            reuse_port=reuse_port,
            family=family,
            idle_timeout=idle_timeout,
            stream=stream,
            exception_handler=exception_handler,
            on_start=on_start,
            on_stop=on_stop,
            bind=bind,
            unix_mode=unix_mode,
            tls=tls,
            tls_handshake_timeout=tls_handshake_timeout,
            proxy_protocol=proxy_protocol,
            trusted_proxies=trusted_proxies,
            proxy_header_timeout=proxy_header_timeout,
            shutdown_port=shutdown_port,
            shutdown_secret=shutdown_secret,
            shutdown_handler=shutdown_handler,
            shutdown_allow_no_secret=shutdown_allow_no_secret,
            access_log=access_log,
        )
        if self._cfg.unix_mode is not None and not names_a_unix_socket(
            self._cfg.bind, self._cfg.address
        ):
            # weft serve says so from its config (and passes no unused unix_mode on).
            log.warning(
                "unix_mode=%s is not used: neither bind nor address names a Unix socket"
                " (unix:PATH) this server makes",
                oct(self._cfg.unix_mode),
            )
        manager = validate("manager", manager)
        manager_options = validate("manager_options", manager_options)
        self._manager, self._owns_manager, self._manager_name = _resolve_manager(
            manager, manager_options
        )
        self._check_kind(self._manager)
        self._life = threading.RLock()
        self._engine: Engine[Any] | None = None
        self._stopping = False
        self._stopped_event = threading.Event()
        self._stopped_event.set()
        #: Set once a stop is over: on_stop and the weft_server_stopped hooks have run
        #: too. What wait(), serve_forever() and a second stop() wait for.
        self._finished = threading.Event()
        self._finished.set()
        self._last_clean = True
        self._last_counts: dict[str, Any] = {}
        self._submitter: Submitter | None = None
        #: pause/resume/limit calls in call order, each with the run's engine it is for
        #: and the event its caller waits on (None: the caller could not wait), and
        #: whether a thread is carrying them out.
        self._controls: deque[
            tuple[Callable[[Engine[Any]], None], Engine[Any], threading.Event | None]
        ] = deque()
        self._controlling = False
        self._error: ServerError | None = None
        self._bound_port: int | None = None
        self._shutdown_port: ShutdownPort | None = None
        #: What an approved shutdown-port request calls (None: ``stop()``, unbounded as
        #: its default is); weft serve routes it into its own stop, as SIGTERM's.
        self._on_shutdown_request: Callable[[], object] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self._manager_name} {', '.join(self.addresses) or self._cfg.address} {state}>"

    # -- checks ------------------------------------------------------------------------

    def _check_kind(self, manager: TaskManager) -> None:
        kind = manager.runtime.kind
        handler = self._cfg.handler
        have = handler_kind(handler)
        if inspect.isasyncgenfunction(_unpartial(handler)):
            raise HandlerKindError(
                f"handler {_describe(handler)} is an async generator function (an `async def`"
                " with `yield`), which no manager runs: drop the `yield`"
            )
        if inspect.isgeneratorfunction(_unpartial(handler)):
            # Called, it returns a generator that nobody runs: every connection was
            # closed unserved, uncounted and unlogged, while the server looked healthy.
            raise HandlerKindError(
                f"handler {_describe(handler)} is a generator function (a `def` with"
                " `yield`): calling it runs none of its body, so it would serve nobody;"
                " drop the `yield`"
            )
        if have != kind and not (kind == "async" and _wraps_async(handler)):
            name = _describe(handler)
            others = ", ".join(
                sorted(n for n, spec in available_managers().items() if spec.handler_kind == have)
            ) or "none installed: pip install " + (
                "weft-trio or weft-asyncio" if have == "async" else "weft-threads or weft-gevent"
            )
            if kind == "async":
                called = getattr(handler, "__name__", "handle")
                shape = (
                    "an `async def` (a lambda cannot be one)"
                    if called == "<lambda>"
                    else f"`async def {called}(stream): ...`"
                )
                hint = (
                    f"write it as {shape} (a decorator around an async def: make its wrapper"
                    " an async def too, or mark it with functools.wraps), or choose a"
                    f" manager that runs plain functions ({others})"
                )
            else:
                hint = (
                    "write it as a plain `def`, or choose a manager that runs async handlers"
                    f" ({others})"
                )
            raise HandlerKindError(
                f"handler {name} is {'an async def' if have == 'async' else 'a plain function'}, "
                f"but manager {self._manager_name!r} runs {kind} handlers: {hint}"
            )
        if self._cfg.stream and manager.runtime.conn_is_stream:
            raise ConfigError(
                f"stream=True asks for a file-like stream, but manager {self._manager_name!r} "
                "already hands handlers a stream; drop stream=True",
                key="stream",
            )
        if self._cfg.stream and kind == "async":
            # The async engine hands the runtime's own connection over as it is: the
            # file stream= makes (socket.makefile) is a plain handler's. Ignored, a
            # runtime declaring conn_is_stream=False let it pass without a word.
            raise ConfigError(
                f"stream=True makes a file of a plain handler's socket, but manager "
                f"{self._manager_name!r} runs async handlers, which get its own "
                "connection; drop stream=True",
                key="stream",
            )

    # -- accessors (Weft's) ---------------------------------------------------------------

    @property
    def task_manager(self) -> TaskManager:
        """The task manager; settable while the server is stopped."""
        return self._manager

    @task_manager.setter
    def task_manager(self, manager: str | TaskManager) -> None:
        with self._life:
            if self._engine is not None:
                raise ServerError(
                    "the task manager can only be changed while the server is stopped"
                )
            new, owns, name = _resolve_manager(manager, None)
            old = (self._manager, self._owns_manager, self._manager_name)
            self._manager, self._owns_manager, self._manager_name = new, owns, name
            try:
                self._check_kind(new)
            except Exception:
                self._manager, self._owns_manager, self._manager_name = old
                raise

    @property
    def manager_name(self) -> str:
        """The manager's registered name (or its class name for an instance)."""
        return self._manager_name

    @property
    def socket(self) -> Any:
        """The (first) listening socket, or None while not listening."""
        sockets = self.sockets
        return sockets[0] if sockets else None

    @property
    def sockets(self) -> list[Any]:
        """Every listening socket (several binds, or a name with several addresses)."""
        engine = self._engine
        return [] if engine is None else engine.sockets()

    @property
    def address(self) -> str:
        """The address to listen on; a change takes effect at the next ``run()``."""
        return self._cfg.address

    @address.setter
    def address(self, value: str) -> None:
        self._cfg.address = validate("address", value)

    @property
    def port(self) -> int:
        """The port: after ``run()`` the one actually bound; settable for the next run.

        A number always: a service name given (``"http"``) is looked up when set.
        """
        if self._bound_port is not None:
            return self._bound_port
        return self._cfg.port

    @port.setter
    def port(self, value: int | str) -> None:
        self._cfg.port = validate("port", value)
        if not self.running:  # while running, ``port`` is the one bound until the next run()
            self._bound_port = None

    @property
    def addresses(self) -> list[str]:
        """``HOST:PORT`` (or ``unix:/path``) of every listener while running."""
        engine = self._engine
        return [] if engine is None else engine.addresses()

    @property
    def shutdown_address(self) -> str | None:
        """``127.0.0.1:PORT`` of the shutdown port while it listens, else None."""
        shutdown = self._shutdown_port
        return None if shutdown is None else shutdown.address

    @property
    def connection_handler(self) -> Callable[..., Any]:
        """The handler called for each connection."""
        return self._cfg.handler

    @property
    def handler_args(self) -> tuple[Any, ...]:
        """Extra positional arguments for the handler (Weft's ``:args``)."""
        return self._cfg.args

    @property
    def running(self) -> bool:
        """True from a successful ``run()`` until ``stop()`` begins."""
        return self._engine is not None and not self._stopping

    @property
    def stopped(self) -> bool:
        """True when nothing of the server is left running."""
        return self._stopped_event.is_set()

    @property
    def error(self) -> ServerError | None:
        """The error that made the server stop itself, if any (e.g. EBADF on accept)."""
        return self._error

    def stats(self) -> dict[str, Any]:
        """Counters since ``run()``: accepted, refused, active, handler_errors, tls_errors, ...

        Also ``bytes_in`` and ``bytes_out`` (summed over ended connections, as the
        kernel counted them; Unix sockets add nothing), ``durations`` (how many
        ended connections lasted at most each bound of ``DURATION_BUCKETS``, in
        seconds, keyed ``"0.005"`` ... ``"3600"``, ``"+Inf"``: cumulative, as a
        Prometheus histogram) and ``duration_sum`` (seconds). After a stop, the last
        run's, with ``left_behind``: the tasks the stop had to leave running (see
        :meth:`stop`).
        """
        engine = self._engine
        if engine is None:
            empty: dict[str, Any] = {**dict.fromkeys(COUNTERS, 0), "bytes_in": 0, "bytes_out": 0}
            empty["durations"] = cumulative([0] * (len(DURATION_BUCKETS) + 1))
            empty["duration_sum"] = 0.0
            return {**empty, **self._last_counts, "active": 0}
        return engine.stats()

    # -- live control (DESIGN section 2; ranch's suspend/resume and set_max_connections) ---

    @property
    def max_connections(self) -> int | None:
        """The most connections served at once; settable while running, effective at once.

        Raised while running, clients waiting for a slot get in at once. Lowered below
        the number open, no connection is cut: new clients wait or are refused (per
        ``on_full``) until enough have ended. ``None`` (no limit) can only be set or
        left while stopped: it takes effect at the next ``run()``. From any thread;
        from inside one of weft's tasks the change is applied a moment later, from
        a thread of its own. A loop kept busy by a task is waited for at most
        ``LOOP_ANSWER`` (2 s, then a warning): the change applies when it runs again.
        """
        return self._cfg.max_connections

    @max_connections.setter
    def max_connections(self, value: int | None) -> None:
        value = validate("max_connections", value)
        with self._life:
            engine = self._engine
            if engine is not None and (value is None) != (engine.limit is None):
                raise ServerError(
                    f"max_connections cannot change from {engine.limit} to {value} while "
                    "running: a limit can be raised or lowered live, but turned on or off "
                    "only while stopped (it takes effect at the next run())"
                )
            self._cfg.max_connections = value
        if engine is not None and value is not None:
            limit = value
            self._control(lambda engine: engine.set_limit(limit))

    @property
    def paused(self) -> bool:
        """True between ``pause_accepting()`` and ``resume_accepting()`` (or the stop)."""
        engine = self._engine
        return engine is not None and engine.paused

    def pause_accepting(self) -> None:
        """Stop accepting, keeping the listeners bound: new clients wait in the backlog.

        ranch's suspend: open connections go on; clients that connect meanwhile
        are queued by the kernel (up to ``backlog``) and served after
        :meth:`resume_accepting`. From any thread; returns once the acceptors have
        stopped (from inside one of weft's tasks or on a running asyncio loop, at
        once: they stop in a moment, and a resume called after it happens after it).
        ``stop()`` while paused stops as usual. Does nothing if not running.
        """
        self._control(lambda engine: engine.pause())

    def resume_accepting(self) -> None:
        """Accept again after :meth:`pause_accepting`; clients waiting in the backlog are served."""
        self._control(lambda engine: engine.resume())

    def _control(self, operation: Callable[[Engine[Any]], None]) -> None:
        """Run a pause, resume or limit change through one control thread, in call order.

        Every call is queued, so a pause and the resume called after it happen in
        that order whoever calls them; a call from a plain thread then waits for its
        own to be done. Inside one of weft's tasks, or on a running asyncio loop, the
        call returns at once: a task cannot wait for acceptor tasks of its own
        runtime, nor a loop for tasks it may be serving. A signal handler that calls
        it while its thread is itself waiting here adds to the queue as anyone else.
        """
        engine = self._engine
        if engine is None or self._stopping:
            return
        done = None if _must_not_block() else threading.Event()
        with self._life:
            self._controls.append((operation, engine, done))
            start = not self._controlling
            self._controlling = True
        if start:
            threading.Thread(target=self._carry_out, name="weft control", daemon=True).start()
        if done is not None:
            done.wait()

    def _carry_out(self) -> None:
        while True:
            with self._life:
                if not self._controls:
                    self._controlling = False
                    return
                operation, engine, done = self._controls.popleft()
            try:
                operation(engine)
            except Exception:
                log.exception("changing the listeners or the limit failed")
            finally:
                if done is not None:
                    done.set()

    def connections(self) -> list[ConnectionSnapshot]:
        """A snapshot of every open connection: its ``ConnectionInfo``, task id, age, bytes.

        Each item is a ``ConnectionInfo`` with ``age`` (seconds), ``bytes_in`` and
        ``bytes_out`` (the kernel's counts so far, None for Unix sockets) and
        ``stop_requested``. Empty while not running. From any thread.
        """
        engine = self._engine
        return [] if engine is None else engine.connections()

    def close_connection(self, task_id: Hashable, timeout: float | None = None) -> bool:
        """Stop one connection in the phases of :meth:`stop`; True if it ended before phase 3.

        Its task's shutdown flag is set and its input ended (a handler waiting for
        its client returns); once ``timeout`` runs out (None: never; 0: at once) it
        is interrupted, and waited for at most ``STOP_GRACE`` more. Raises
        ``LookupError`` if no open connection is served by task ``task_id`` (see
        :meth:`connections`). From inside one of weft's tasks, or on a running asyncio
        loop, it cannot wait: it starts the work in a thread of its own and returns
        False at once.
        """
        timeout = _seconds(timeout, "close_connection()")
        engine = self._engine
        conn = None if engine is None else engine.find(task_id)
        if engine is None or conn is None:
            raise LookupError(
                f"close_connection({task_id!r}): no open connection is served by that task; "
                "server.connections() lists the open ones and their task ids"
            )
        if not _must_not_block():
            return engine.close_one(conn, timeout)
        threading.Thread(
            target=engine.close_one, args=(conn, timeout), name="weft close", daemon=True
        ).start()
        return False

    @overload
    def submit(  # an async def's Future holds its awaited result
        self, fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any
    ) -> Future[_T]: ...

    @overload
    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]: ...

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in the server's runtime, from any thread; a Future of its result.

        ``fn`` is a plain function on sync managers (threads, gevent) and an
        ``async def`` on async ones (trio, asyncio), as the handler is; it runs with the
        caller's contextvars. The way to reply later, from elsewhere, to a parked
        connection: wake its handler from ``fn`` (set its event, fill its queue).
        On gevent it runs in a greenlet of the hub, on trio in a task of the
        manager's nursery, on asyncio in a task of the loop (calls from one thread
        are batched: one wake-up of the loop for many calls); on ``threads`` in an
        idle thread reused, else a new one (so ``threading.local`` state one call
        leaves may be seen by a later one), never counted against ``limit``; on
        managers without ``spawn_soon``, as a task of the manager.

        Raises ServerError if the server is not running, HandlerKindError for a
        function of the wrong kind (by the handler's rules: docs/api.md), for a
        generator or async generator function, and for what is not callable. When
        the server stops, a call that never started is cancelled, and one still
        running gets a ServerError (and, still running past the stop's bound, counts
        in ``stats()["left_behind"]``). ``fn`` runs in the runtime's loop on the evented
        managers: it must not block. Its Future's ``result()`` called in that loop's
        own thread waits cooperatively on gevent and raises RuntimeError on trio and
        asyncio, where ``await fn(*args)`` is the way.
        """
        submitter = self._submitter
        if submitter is None or self._engine is None:
            raise ServerError("submit() needs a running server: call run() first")
        if not callable(fn):
            raise HandlerKindError(
                f"submit({fn!r:.80}): that is not callable (a {type(fn).__name__}); pass the"
                " function to run, then its arguments: submit(fn, *args)"
            )
        try:
            problem = submitter.kinds.get(fn)
        except TypeError:  # unhashable (a frozen dataclass holding a list, say)
            problem = None
        if problem is None:
            problem = submitter.remember(fn, self._submit_problem(fn, submitter.kind))
        if problem:
            raise HandlerKindError(problem)
        return submitter.submit(fn, args)

    def _submit_problem(self, fn: Callable[..., Any], kind: str) -> str:
        """Why ``submit(fn)`` cannot run ``fn`` on a runtime of ``kind``; "" if it can.

        The handler's rules (:meth:`_check_kind`), in submit's words.
        """
        target = _unpartial(fn)
        name = f"submit({_describe(fn)})"
        if inspect.isasyncgenfunction(target):
            return (
                f"{name}: it is an async generator function (an `async def` with `yield`),"
                " whose body a call never runs, on any manager: drop the `yield`"
            )
        if inspect.isgeneratorfunction(target):
            return (
                f"{name}: it is a generator function (a `def` with `yield`), whose body a"
                " call never runs: drop the `yield`"
            )
        have = handler_kind(fn)
        if have == kind or (kind == "async" and _wraps_async(fn)):
            return ""
        need = "an async def" if kind == "async" else "a plain function"
        return (
            f"{name}: manager {self._manager_name!r} runs {kind} code, so pass {need} "
            f"(got {'an async def' if have == 'async' else 'a plain function'})"
        )

    # -- operations ------------------------------------------------------------------------

    def run(self) -> None:
        """Start listening and serving in the background; return once listening.

        Raises :class:`~weft_core.BindError` naming the address if it cannot
        listen, and :class:`~weft_core.ServerError` if already running, or still
        stopping (a stop begun from inside the runtime returns before it ends).
        """
        with self._life:
            finishing = self._engine is None and not self._finished.is_set()
            if finishing or (self._engine is not None and self._stopping):
                raise ServerError(
                    "the server's stop is still under way; wait for it (server.wait(), which"
                    " returns once its on_stop and stopped hooks have run) before run() again"
                )
            if self._engine is not None:
                raise ServerError(
                    f"the server is already running on {', '.join(self.addresses)}; stop() it first"
                )
            cfg = self._cfg
            listeners = open_listeners(
                listen_endpoints(cfg.bind, cfg.address, cfg.port),
                family=cfg.family,
                backlog=cfg.backlog,
                reuse_port=cfg.reuse_port,
                unix_mode=cfg.unix_mode,
            )
            shutdown = None
            try:
                if cfg.shutdown_port is not None:
                    shutdown = ShutdownPort(
                        self,
                        cfg.shutdown_port,
                        cfg.shutdown_secret,
                        cfg.shutdown_handler,
                        allow_no_secret=cfg.shutdown_allow_no_secret,
                        stop=self._on_shutdown_request,
                    )
                    shutdown.open()
                engine = self._make_engine(listeners)
            except BaseException:
                for listener in listeners:
                    listener.sock.close()
                if shutdown is not None:
                    shutdown.close()
                raise
            # The bound port first: another thread that sees the server running (its
            # engine set) reads the port at once, and got the configured 0 meanwhile.
            tcp = [
                sock.getsockname()
                for sock in engine.sockets()
                if sock.family in (socket.AF_INET, socket.AF_INET6)
            ]
            self._bound_port = tcp[0][1] if tcp else None
            self._engine = engine
            self._submitter = Submitter(self._manager)
            self._error = None
            self._stopping = False
            self._stopped_event.clear()
            self._finished.clear()
            self._shutdown_port = shutdown
            try:
                engine.start()
            except BaseException as exc:
                self._abandon(engine)
                if isinstance(exc, Exception) and not isinstance(exc, WeftError):
                    # A manager's own error, not weft's: say whose, in one line.
                    raise ServerError(
                        f"task manager {self._manager_name!r} could not start the acceptor "
                        f"({type(exc).__name__}: {exc}); the listeners are closed"
                    ) from exc
                raise
            self._submitter.note_loop_thread()
            if shutdown is not None:
                shutdown.start()
        if cfg.on_start is not None:
            try:
                cfg.on_start(self)
            except BaseException:
                self._stop_after_failed_start()
                raise
        if self.running:  # not if on_start (or another thread) stopped it already
            hooks().server_started(self, self.addresses)

    def _stop_after_failed_start(self) -> None:
        """``stop(0)``, waited for where ``stop()`` itself returns at once.

        ``run()`` raises what ``on_start`` raised "with nothing left listening"; from
        a coroutine (or a task) the stop went on in a thread, and ``run()`` raised
        while the port still took clients, or another server could not bind it. A
        stop of a server that served nobody takes milliseconds: waited for here, in
        a thread of its own, up to ``LOOP_WAIT``. Not where the runtime's loop is the
        caller's (weft-asyncio on the application's loop, a gevent handler's hub):
        that loop closes the listener, once the caller lets it run.
        """
        if not _must_not_block() or _loop_runs_here(self._manager.runtime):
            self.stop(timeout=0)  # (on the runtime's own loop: once the caller lets it run)
            return
        stopper = threading.Thread(target=self.stop, args=(0,), name="weft stop", daemon=True)
        stopper.start()
        stopper.join(LOOP_WAIT)

    def _make_engine(self, listeners: list[Any]) -> Engine[Any]:
        """The engine of the flavour the manager's runtime asks for."""
        manager = self._manager
        runtime = manager.runtime
        plugins = hooks()
        if _is_async(runtime):
            return AsyncEngine(
                self._cfg, manager, runtime, listeners, plugins, self, self._on_fatal
            )
        if _is_sync(runtime):
            return SyncEngine(
                self._cfg, manager, runtime, listeners, plugins, self, self._on_fatal
            )
        raise ServerError(f"runtime {runtime!r} has kind {runtime.kind!r}: not 'sync' or 'async'")

    def _abandon(self, engine: Engine[Any]) -> None:
        engine.closing = True
        engine.stop_acceptors(LOOP_WAIT)
        for lt in engine.listeners:
            lt.close()
        self._finish(engine, StopReport(clean=True))

    def serve_forever(self, graceful_timeout: float | None = None) -> None:
        """``run()`` if needed, then block until stopped; Ctrl-C stops gracefully.

        Raises the :class:`~weft_core.ServerError` that made the server stop itself, if
        any. ``RuntimeError`` on a running asyncio loop or inside one of weft's tasks,
        where it would block for good: there, ``run()``, then wait as the loop does.
        """
        graceful_timeout = _seconds(graceful_timeout, "serve_forever()")
        _refuse_to_block("serve_forever()")
        if self._engine is None:
            self.run()
        try:
            self._finished.wait()
        except KeyboardInterrupt:
            log.info("interrupted; stopping (graceful timeout %s)", graceful_timeout)
            self.stop(timeout=graceful_timeout)
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped, its stopped hooks run; False on ``timeout``.

        ``RuntimeError`` for ``wait()`` with no timeout where it would never return
        (see :meth:`serve_forever`).
        """
        if timeout is None:
            _refuse_to_block("wait()")
        return self._finished.wait(_seconds(timeout, "wait()"))

    def stop_accepting(self) -> None:
        """Close only the listeners; open connections go on until their clients close them.

        Returns as soon as the listeners are closed (from inside one of weft's tasks,
        or on a running asyncio loop, at once: they close in a moment), or after
        ``LOOP_WAIT`` if a handler blocks the runtime's loop: a Unix socket's file is
        removed by then, a TCP listener closes once the loop answers. The server
        counts as stopped once its last connection has ended.
        """
        with self._life:
            engine = self._engine
            if engine is None or engine.listeners_closed or self._stopping:
                return
            engine.listeners_closed = True
        engine.stop_acceptors(None if _must_not_block() else LOOP_WAIT)

        def drain() -> None:
            engine.wait_idle(None)
            if self._engine is engine:
                self.stop()

        threading.Thread(target=drain, name="weft drain", daemon=True).start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully in three phases (docs/api.md; docs/architecture.md, the stop).

        ``timeout`` bounds phase 2 (None, or infinity: wait for every connection; 0:
        interrupt at once; NaN, or what is no number, is refused before anything
        stops). Returns True if every task ended before it had to be interrupted,
        False otherwise, once no listener and no connection is left open; with a
        ``timeout``, within ``timeout`` plus ``STOP_GRACE`` seconds however many tasks
        are stuck (those still running then are left behind: ``stats()["left_behind"]``).

        Called from inside one of weft's tasks (a handler, a hook run by the
        acceptor), it cannot wait, since its own task is part of what stops: it
        starts the stop in a thread of its own and returns False at once; the
        caller's task is flagged like any other, and :meth:`wait` (from outside)
        tells when the stop has ended. The same from a coroutine on a running asyncio
        loop, which blocking would freeze (and deadlock, when that loop serves the
        connections): ``await asyncio.to_thread(server.stop, timeout)`` there for the
        result. Called while another stop is under way, it waits for that one and
        returns its result; a ``timeout`` that ends sooner than that stop's brings
        its interruption forward (a quick stop after a graceful one). An exception raised into the waiting caller (a second
        Ctrl-C) leaves the stop going on in a thread, its graceful phase cut short,
        so the next ``stop()`` returns by that stop's bound.
        """
        timeout = _seconds(timeout, "stop()")
        inside = _must_not_block()
        with self._life:
            engine = self._engine
            finishing = engine is None and not self._finished.is_set()
            if engine is not None:
                waiter = self._stopping
                self._stopping = True
        if engine is None:
            # Its on_stop and weft_server_stopped hooks may still run: wait for them,
            # unless called from one of them, and no longer than our own bound.
            if finishing and not inside and getattr(_finisher, "server", None) is not self:
                self._wait_finished(timeout)
            return self._last_clean if finishing else True
        if waiter:
            if timeout is not None:  # the stop under way ends its graceful phase by ours
                engine.hurry(time.monotonic() + timeout)
            if inside:
                return False
            return self._wait_finished(timeout) and self._last_clean
        if inside:
            threading.Thread(
                target=self._stop, args=(engine, timeout), name="weft stop", daemon=True
            ).start()
            return False
        try:
            return self._stop(engine, timeout)
        except BaseException:
            # Raised into the waiting caller (a second Ctrl-C): the stop must not be
            # left half done, with every later stop() waiting for it. It goes on in a
            # thread, its graceful phase cut short: what is still open is interrupted.
            if self._engine is engine:
                threading.Thread(
                    target=self._stop, args=(engine, 0), name="weft stop", daemon=True
                ).start()
            raise

    def _wait_finished(self, timeout: float | None) -> bool:
        """Wait for the stop under way, by ``timeout`` plus STOP_GRACE (None: no bound).

        True once its connections are done, though a blocking stopped hook may still
        run (then logged, and left running, as the stop that started it leaves it).
        """
        bound = None if timeout is None else max(timeout, 0.0) + STOP_GRACE
        if self._finished.wait(bound):
            return True
        if self._stopped_event.is_set():
            # Every connection is done; the stop under way is still in its last
            # steps (on_stop, the weft_server_stopped hooks), maybe only just begun:
            # a stop that started it left stuck tasks at its own bound a moment ago.
            log.warning(
                "stop(): the stop under way has ended its connections but not yet its "
                "on_stop and weft_server_stopped hooks; returning at this stop's bound "
                "without waiting for them"
            )
            return True
        return False

    def _stop(self, engine: Engine[Any], timeout: float | None) -> bool:
        began = time.monotonic()
        self._close_shutdown_port()
        with short_switches.held(), contextlib.ExitStack() as interrupting:
            # Once tasks must be interrupted, to the stop's end: every thread on one CPU,
            # so a task spinning through its interruption keeps no GIL from the stop.
            report = engine.stop(timeout, lambda: interrupting.enter_context(one_cpu.held()))
            self._last_clean = report.clean
            deadline = None if timeout is None else began + timeout + STOP_GRACE
            calls_left = self._finish(engine, report, deadline)
        return report.clean and not calls_left

    def _close_shutdown_port(self) -> None:
        with self._life:
            shutdown, self._shutdown_port = self._shutdown_port, None
        if shutdown is not None:
            shutdown.close()

    def _finish(
        self, engine: Engine[Any], report: StopReport, deadline: float | None = None
    ) -> int:
        """Release what the run held; the runtime's close bounded by ``deadline`` (monotonic).

        Returns how many ``submit()``ted calls still ran at the stop's bound: left
        behind as stuck tasks are (counted in ``left_behind``, the stop not clean).
        """
        self._close_shutdown_port()
        engine.close()
        submitter, self._submitter = self._submitter, None
        if submitter is not None:
            submitter.close()
        if self._owns_manager:
            if report.left:
                # Closing would wait for the stuck tasks (trio joins its loop thread):
                # it is closed once they have ended, unless a new run uses it again.
                log.debug(
                    "the %s runtime is left running with its stuck tasks", self._manager_name
                )
                threading.Thread(
                    target=self._close_runtime_when_idle,
                    args=(self._manager, engine),
                    name=f"weft {self._manager_name} runtime, closed once idle",
                    daemon=True,
                ).start()
            else:
                self._close_runtime(deadline)
        calls_left = 0 if submitter is None else submitter.left_running(deadline)
        self._last_counts = {**engine.stats(), "active": 0}
        if calls_left:
            self._last_counts["left_behind"] = self._last_counts.get("left_behind", 0) + calls_left
            self._last_clean = False
            log.warning(
                "%d submit()ted call(s) still run past the stop's bound (a call that "
                "blocks, or ignores its cancellation); left behind",
                calls_left,
            )
        # Stopped, but not yet done: wait() and a second stop() return (and run()
        # may start again) only once on_stop and the hooks have run, so that a hook
        # never runs after the next run has begun, nor after the program went on.
        with self._life:
            self._engine = None
            self._stopping = False
            self._stopped_event.set()
        exit_: BaseException | None = None
        try:
            try:
                self._run_as_finisher(self._call_on_stop)
            except EXITS as exc:  # raised to the caller, once the plugins have been told
                exit_ = exc
            stats = self.stats()
            # A plugin's hook that blocks (a metrics push to a service that is down)
            # must not hold a stop promised to end by its timeout plus STOP_GRACE.
            wait = _within(
                lambda: self._run_as_finisher(lambda: hooks().server_stopped(self, stats)),
                deadline,
                "weft_server_stopped hooks",
            )
            if wait is not None:
                log.warning(
                    "a plugin's weft_server_stopped hook still runs %.1fs later; the stop "
                    "returns without it (hooks must not block: docs/hooks.md)",
                    wait,
                )
        finally:
            self._finished.set()
        if exit_ is not None:
            raise exit_
        return calls_left

    def _call_on_stop(self) -> None:
        if self._cfg.on_stop is not None:
            try:
                self._cfg.on_stop(self)
            except EXITS:
                raise  # to the caller of stop(), once the plugins have been told
            except BaseException as exc:  # any other: a custom one, a group, a cancellation
                log_untrusted_exception(
                    log, logging.ERROR, exc, "on_stop callback %r raised", self._cfg.on_stop
                )

    def _run_as_finisher(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` marked as this server's stop's last step (a stop() in it returns)."""
        _finisher.server = self
        try:
            fn()
        finally:
            _finisher.server = None

    def _close_runtime(self, deadline: float | None) -> None:
        """Close the runtime, giving up at ``deadline`` (None: wait as long as it takes).

        A task that is no connection's (a ``submit()``ted call) and ignores its
        cancellation would hold an event-loop runtime's close, and with it a stop
        promised to end by its timeout plus ``STOP_GRACE``: the close goes on in
        the background, and the stop returns.
        """
        name = f"closing the {self._manager_name} runtime"
        wait = _within(self._manager.runtime.close, deadline, name)
        if wait is not None:
            log.warning(
                "the %s runtime did not close within %.1fs: one of its tasks (a call "
                "given to submit()?) does not end when cancelled, or the manager's "
                "runtime.close() itself blocks; it is left running",
                self._manager_name,
                wait,
            )

    def _close_runtime_when_idle(self, manager: TaskManager, engine: Engine[Any]) -> None:
        """Close a runtime a stop left running with stuck tasks, once they have ended.

        Its loop thread and descriptors stayed for the life of the process otherwise,
        one set per server made afresh after such a stop. A new ``run()`` of this
        server uses the same manager again: then its own stop closes it.
        """
        pause = RUNTIME_IDLE_POLL
        while True:
            current = self._engine  # ``engine`` until the stop has finished
            if (current is not None and current is not engine) or self._manager is not manager:
                return  # running again (or given another manager): not ours to close
            if current is None and not manager.all_tasks():
                break
            time.sleep(pause)
            pause = min(pause * 2, RUNTIME_IDLE_POLL_MOST)
        with self._life:
            if self._engine is not None or self._manager is not manager:
                return
            self._close_runtime(time.monotonic() + RUNTIME_IDLE_CLOSE)
        log.debug("the %s runtime closed: its stuck tasks have ended", self._manager_name)

    def _on_fatal(self) -> None:
        engine = self._engine
        if engine is None:
            return
        self._error = engine.error

        def stop_after_error() -> None:
            self.stop(timeout=FATAL_STOP_TIMEOUT)

        threading.Thread(target=stop_after_error, name="weft fatal stop", daemon=True).start()

    def __enter__(self) -> Server:
        if self._engine is None:
            self.run()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """``stop()``, with no timeout: waits for every connection (docs/api.md).

        As ``concurrent.futures`` executors and ``socketserver`` do at a ``with``
        block's end; end the block with ``stop(timeout)`` for a bound.
        """
        self.stop()


def _within(fn: Callable[[], object], deadline: float | None, name: str) -> float | None:
    """Run ``fn()`` for a stop whose bound is ``deadline`` (monotonic; None: unbounded).

    Unbounded, here; bounded, in a thread waited for until ``deadline`` (at least
    :data:`CLOSE_FLOOR`). Returns the seconds waited if ``fn`` still runs then,
    else None; an exception is logged as ``name`` failing.
    """
    if deadline is None:
        try:
            fn()
        except Exception:
            log.exception("%s failed", name)
        return None
    wait = max(deadline - time.monotonic(), CLOSE_FLOOR)
    return None if call_within(fn, wait, name) else wait


def _seconds(timeout: float | None, what: str) -> float | None:
    """``timeout`` checked before anything starts: None for ever, else seconds (at least 0).

    An infinite one, or one past what the OS waits (``threading.TIMEOUT_MAX``), means
    for ever, as None does; NaN or a value that is no number is refused at once,
    where it had raised inside a stop already begun and cut every connection.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{what}: timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout):
        raise ValueError(f"{what}: timeout must be a number of seconds or None, not NaN")
    if timeout >= threading.TIMEOUT_MAX:
        return None
    return max(float(timeout), 0.0)


def _must_not_block() -> bool:
    """True where stop() must not wait: inside one of weft's tasks, or on a running asyncio loop."""
    return _inside_a_task() or _on_a_loop()


def _loop_runs_here(runtime: SyncRuntime | AsyncRuntime) -> bool:
    """True if ``runtime``'s loop may run in this thread: a wait here could block it.

    Inside one of weft's tasks it may (a gevent handler's hub, a trio or asyncio
    loop). Else only an async runtime's loop may be this thread's running loop
    (weft-asyncio on the application's loop), which its ``run_in_loop`` tells: it
    runs the probe here, at once.
    """
    if _inside_a_task():
        return True
    if runtime.kind != "async":
        return False
    here = threading.get_ident()
    ran_in: list[int] = []
    runtime.run_in_loop(lambda: ran_in.append(threading.get_ident()), 0)
    return ran_in[:1] == [here]


def _inside_a_task() -> bool:
    """True in the thread that runs one of weft's tasks, as that task.

    Not in another thread given a copy of its context (``asyncio.to_thread``, a
    ``copy_context().run`` thread): blocking there holds up no task.
    """
    state = current_task()
    return state is not None and state.thread in (None, threading.get_ident())


def _on_a_loop() -> bool:
    """True on a running asyncio loop.

    asyncio is looked up, never imported: if nothing imported it, no loop runs.
    """
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _refuse_to_block(call: str) -> None:
    """``RuntimeError`` for a wait with no end where it would never end.

    On a running asyncio loop the wait freezes the loop, which the server's own
    tasks may need to stop (they do on it, with the application's loop); inside one
    of weft's tasks, that task is part of what must stop. The application hung for
    good, where stop() there already returns at once.
    """
    if _must_not_block():
        where = "on a running asyncio loop" if _on_a_loop() else "inside one of weft's tasks"
        raise RuntimeError(
            f"{call} blocks until the server has stopped, and was called {where}, which it "
            "would block for good; from a coroutine, 'await asyncio.to_thread(server.wait)' "
            "(trio: 'await trio.to_thread.run_sync(server.wait)')"
        )


def _is_async(runtime: SyncRuntime | AsyncRuntime) -> TypeGuard[AsyncRuntime]:
    return runtime.kind == "async"


def _configured_manager() -> tuple[str, dict[str, Any] | None, Mapping[str, str]]:
    """The manager weft's config names, its options, and where each was set.

    A config naming no manager gives ``DEFAULT_MANAGER`` with the config's
    ``manager_options``, as ``weft serve`` applies them: the same config is the
    same server, and a mistake in them is an error either way.

    ``Server(handler)`` with no manager: "config, else threads" (DESIGN section 2),
    where config is what ``weft serve`` reads, ``WEFT_MANAGER`` (and
    ``WEFT_MANAGER_OPTIONS_*``) over ``weft.toml`` or ``[tool.weft]`` in the
    current directory. A mistake there is a ConfigError naming its source.
    """
    from ._config import load_config  # here: only a Server with no manager reads it

    # The manager's own variables only: a WEFT_BACKLOG that weft serve would refuse
    # is no business of a Server made in Python (the file is read whole, as the
    # config it is; ``$WEFT_CONFIG`` names another).
    environ = {
        k: v
        for k, v in os.environ.items()
        if k in ("WEFT_MANAGER", "WEFT_CONFIG") or k.startswith("WEFT_MANAGER_OPTIONS_")
    }
    config = load_config(environ=environ)
    name = config.values.get("manager")
    options = config.values.get("manager_options")
    return name if isinstance(name, str) else DEFAULT_MANAGER, options, config.origins


def _is_sync(runtime: SyncRuntime | AsyncRuntime) -> TypeGuard[SyncRuntime]:
    return runtime.kind == "sync"


# -- settings checks -------------------------------------------------------------------


def _resolve_manager(
    manager: Any, options: dict[str, Any] | None
) -> tuple[TaskManager, bool, str]:
    origins: Mapping[str, str] = {}
    if manager is None:
        manager, configured, origins = _configured_manager()
        if options is None:
            options = configured
        else:
            origins = {"manager": origins["manager"]} if "manager" in origins else {}
    if isinstance(manager, str):
        try:
            return create_manager(manager, **(options or {})), True, manager
        except (UnknownManagerError, ConfigError) as exc:
            # A name or options the program never wrote, from a file or a variable:
            # the error names which, as weft serve's does.
            from ._config import with_source

            sourced = with_source(exc, origins) if origins else exc
            if sourced is exc:
                raise
            raise sourced from exc
    if options:
        raise ConfigError(
            "manager_options only apply when the manager is given by name; "
            "pass the options to your manager instance instead",
            key="manager_options",
        )
    problem = manager_problem(manager)
    if problem is not None:
        raise ConfigError(
            f"manager must be a manager name or a TaskManager; {manager!r} {problem}",
            key="manager",
        )
    return manager, False, type(manager).__name__
