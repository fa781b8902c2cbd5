"""The Server: Weft's ``server`` class, with Sagittarius' and LispWorks' options.

The Server checks its settings when it is made, opens its listeners in ``run()``
(so a bind error reaches the caller), and hands the running machinery to an
:class:`~weft_core._engine.Engine`. ``stop()`` is a graceful stop in three phases,
the same on every manager:

1. close the listeners (new clients are refused at once);
2. flag every connection's task and end its input (``shutdown(SHUT_RD)``), so a
   handler waiting for its client's next bytes returns, while one in the middle of
   a reply can finish writing it;
3. when ``timeout`` runs out, interrupt what is left: shut each socket down for
   reading and writing, then the manager's ``stop_task`` (gevent kills, trio
   cancels; a thread has been woken by its socket).
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._connection import ConnectionInfo
from ._engine import COUNTERS, Engine
from ._errors import ConfigError, HandlerKindError, ServerError
from ._listeners import FAMILIES, Family, ListenTarget, open_listeners
from ._protocol import TaskManager
from ._proxy import DEFAULT_TRUSTED_PROXIES, ProxyPolicy
from ._shutdown_port import ShutdownHandler, ShutdownPort, check_allow_no_secret
from ._spec import HandlerKind
from ._tasks import current_task
from ._tls import make_server_context

if TYPE_CHECKING:
    import ssl

__all__ = ["DEFAULT_MANAGER", "DEFAULT_MAX_CONNECTIONS", "Server"]

log = logging.getLogger("weft.server")

#: The manager used when neither the Server nor config names one.
DEFAULT_MANAGER = "threads"
#: ranch's default: a flood of clients must not create unbounded threads.
DEFAULT_MAX_CONNECTIONS = 1024
#: LispWorks' and gunicorn's default listen backlog (the kernel caps it at somaxconn).
DEFAULT_BACKLOG = 1024
#: How long a stop waits for tasks to end after interrupting them; only a task that
#: ignores both its shutdown flag and its closed socket takes this long.
INTERRUPT_WAIT = 5.0
#: Grace given to open connections when the server stops itself on a fatal accept error.
FATAL_STOP_TIMEOUT = 10.0

OnFull = Literal["refuse", "backlog"]
ExceptionHandler = Callable[["Server", Any, BaseException], object]
Callback = Callable[["Server"], object]


@dataclass(frozen=True)
class _Target:
    kind: str
    host: str | None = None
    port: int | str | None = None
    path: str | None = None
    fd: int | None = None


@dataclass
class _Settings:
    handler: Callable[..., Any]
    args: tuple[Any, ...]
    address: str
    port: int | str
    bind: list[str] | None
    max_connections: int | None
    full_wait: float
    on_full: OnFull
    backlog: int
    nodelay: bool
    keepalive: bool
    reuse_port: bool
    family: Family
    idle_timeout: float | None
    stream: bool
    exception_handler: ExceptionHandler | None
    on_start: Callback | None
    on_stop: Callback | None
    unix_mode: int | None
    tls: ssl.SSLContext | None
    tls_handshake_timeout: float
    proxy: ProxyPolicy | None
    shutdown_port: int | None
    shutdown_secret: str | None
    shutdown_handler: ShutdownHandler | None
    shutdown_allow_no_secret: bool


def handler_kind(handler: Callable[..., Any]) -> HandlerKind:
    """``"async"`` for an ``async def`` (or a partial or object wrapping one), else ``"sync"``."""
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - instances with async __call__
    ):
        return "async"
    return "sync"


def _describe(handler: Callable[..., Any]) -> str:
    module = getattr(handler, "__module__", None)
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}:{name}" if module else name


class Server:
    """A TCP (or Unix socket) server whose connections run on a pluggable task manager.

    ``handler(conn, *args)`` is called for each connection, with ``conn`` native to
    the manager: a socket for ``threads``, a gevent socket for ``gevent``, a
    ``trio.SocketStream`` for ``trio``. See DESIGN.md section 2 for every keyword.

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
        tls: Any = None,
        tls_handshake_timeout: float = 10.0,
        proxy_protocol: bool = False,
        trusted_proxies: Sequence[str] = DEFAULT_TRUSTED_PROXIES,
        proxy_header_timeout: float = 5.0,
        shutdown_port: int | None = None,
        shutdown_secret: str | None = None,
        shutdown_handler: ShutdownHandler | None = None,
        shutdown_allow_no_secret: bool = False,
    ) -> None:
        if not callable(handler):
            raise ConfigError(f"handler must be callable, not {handler!r}", key="handler")
        self._cfg = _Settings(
            handler=handler,
            args=tuple(args),
            address=_check_str("address", address),
            port=_check_port(port),
            bind=_check_bind(bind),
            max_connections=_check_limit(max_connections),
            full_wait=_check_seconds("full_wait", full_wait, allow_none=False) or 0.0,
            on_full=_check_choice("on_full", on_full, ("refuse", "backlog")),
            backlog=_check_positive_int("backlog", backlog),
            nodelay=_check_bool("nodelay", nodelay),
            keepalive=_check_bool("keepalive", keepalive),
            reuse_port=_check_bool("reuse_port", reuse_port),
            family=_check_choice("family", family, FAMILIES),
            idle_timeout=_check_seconds("idle_timeout", idle_timeout, allow_none=True),
            stream=_check_bool("stream", stream),
            exception_handler=exception_handler,
            on_start=on_start,
            on_stop=on_stop,
            unix_mode=unix_mode,
            tls=None if tls is None else make_server_context(tls),
            tls_handshake_timeout=_check_seconds(
                "tls_handshake_timeout", tls_handshake_timeout, allow_none=False
            )
            or 0.0,
            proxy=_proxy_policy(proxy_protocol, trusted_proxies, proxy_header_timeout),
            shutdown_port=_check_shutdown_port(shutdown_port, shutdown_secret, shutdown_handler),
            shutdown_secret=shutdown_secret,
            shutdown_handler=shutdown_handler,
            shutdown_allow_no_secret=check_allow_no_secret(
                shutdown_port, shutdown_secret, shutdown_handler, shutdown_allow_no_secret
            ),
        )
        self._manager, self._owns_manager, self._manager_name = _resolve_manager(
            manager, manager_options
        )
        self._check_kind(self._manager)
        self._life = threading.RLock()
        self._engine: Engine | None = None
        self._stopping = False
        self._stopped_event = threading.Event()
        self._stopped_event.set()
        self._last_clean = True
        self._last_counts: dict[str, int] = {}
        self._error: ServerError | None = None
        self._bound_port: int | None = None
        self._shutdown_port: ShutdownPort | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self._manager_name} {', '.join(self.addresses) or self._cfg.address} {state}>"

    # -- checks ------------------------------------------------------------------------

    def _check_kind(self, manager: TaskManager) -> None:
        kind = manager.runtime.kind
        have = handler_kind(self._cfg.handler)
        if have != kind:
            name = _describe(self._cfg.handler)
            if kind == "async":
                hint = (
                    f"write it as `async def {getattr(self._cfg.handler, '__name__', 'handle')}"
                    "(stream): ...`, or choose a manager that runs plain functions (threads, gevent)"
                )
            else:
                hint = "write it as a plain `def`, or choose a manager that runs async handlers (trio)"
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
        engine = self._engine
        if engine is None or engine.listeners_closed:
            return None
        return engine.listeners[0].native

    @property
    def sockets(self) -> list[Any]:
        """Every listening socket (several binds, or a name with several addresses)."""
        engine = self._engine
        if engine is None or engine.listeners_closed:
            return []
        return [lt.native for lt in engine.listeners]

    @property
    def address(self) -> str:
        """The address to listen on; a change takes effect at the next ``run()``."""
        return self._cfg.address

    @address.setter
    def address(self, value: str) -> None:
        self._cfg.address = _check_str("address", value)

    @property
    def port(self) -> int | str:
        """The port: after ``run()`` the one actually bound; settable for the next run."""
        if self._bound_port is not None:
            return self._bound_port
        return self._cfg.port

    @port.setter
    def port(self, value: int | str) -> None:
        self._cfg.port = _check_port(value)
        self._bound_port = None

    @property
    def addresses(self) -> list[str]:
        """``HOST:PORT`` (or ``unix:/path``) of every listener while running."""
        engine = self._engine
        return [] if engine is None else [lt.address for lt in engine.listeners]

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

    def stats(self) -> dict[str, int]:
        """Counters since ``run()``: accepted, refused, active, handler_errors, tls_errors, ..."""
        engine = self._engine
        if engine is None:
            return {**dict.fromkeys(COUNTERS, 0), **self._last_counts, "active": 0}
        with engine.lock:
            return {**engine.counts, "active": len(engine.conns)}

    # -- operations ------------------------------------------------------------------------

    def _targets(self) -> list[ListenTarget]:
        cfg = self._cfg
        if cfg.bind:
            from ._endpoints import parse_endpoint

            return [parse_endpoint(text) for text in cfg.bind]
        if cfg.address.startswith("unix:"):
            return [_Target("unix", path=cfg.address[len("unix:") :])]
        return [_Target("tcp", host=cfg.address, port=cfg.port)]

    def run(self) -> None:
        """Start listening and serving in the background; return once listening.

        Raises :class:`~weft_core.BindError` naming the address if it cannot
        listen, and :class:`~weft_core.ServerError` if already running.
        """
        with self._life:
            if self._engine is not None:
                raise ServerError(
                    f"the server is already running on {', '.join(self.addresses)}; stop() it first"
                )
            cfg = self._cfg
            listeners = open_listeners(
                self._targets(),
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
                    )
                    shutdown.open()
                engine = Engine(self, self._manager, listeners)
            except BaseException:
                for listener in listeners:
                    listener.sock.close()
                if shutdown is not None:
                    shutdown.close()
                raise
            engine.on_fatal = self._on_fatal
            self._engine = engine
            self._error = None
            self._stopping = False
            self._stopped_event.clear()
            tcp = [
                lt.native.getsockname()
                for lt in engine.listeners
                if lt.native.family in (socket.AF_INET, socket.AF_INET6)
            ]
            self._bound_port = tcp[0][1] if tcp else None
            self._shutdown_port = shutdown
            try:
                engine.start()
            except BaseException:
                self._abandon(engine)
                raise
            if shutdown is not None:
                shutdown.start()
        if cfg.on_start is not None:
            try:
                cfg.on_start(self)
            except BaseException:
                self.stop(timeout=0)
                raise
        self._hooks().server_started(self, self.addresses)

    def _abandon(self, engine: Engine) -> None:
        engine.closing = True
        engine.stop_acceptors()
        for lt in engine.listeners:
            lt.close()
        self._finish(engine)

    def serve_forever(self, graceful_timeout: float | None = None) -> None:
        """``run()`` if needed, then block until stopped; Ctrl-C stops gracefully.

        Raises the :class:`~weft_core.ServerError` that made the server stop itself, if any.
        """
        if self._engine is None:
            self.run()
        try:
            self._stopped_event.wait()
        except KeyboardInterrupt:
            log.info("interrupted; stopping (graceful timeout %s)", graceful_timeout)
            self.stop(timeout=graceful_timeout)
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` ran out first."""
        return self._stopped_event.wait(timeout)

    def stop_accepting(self) -> None:
        """Close only the listeners; open connections go on until their clients close them.

        Returns as soon as the listeners are closed. The server counts as stopped
        once its last connection has ended.
        """
        with self._life:
            engine = self._engine
            if engine is None or engine.listeners_closed:
                return
            engine.listeners_closed = True
        engine.stop_acceptors()

        def drain() -> None:
            engine.wait_idle(None)
            if self._engine is engine:
                self.stop()

        threading.Thread(target=drain, name="weft drain", daemon=True).start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully in three phases (see the module docstring).

        ``timeout`` bounds phase 2 (None: wait for every connection; 0: interrupt
        at once). Returns True if every task ended before it had to be interrupted;
        in both cases only once no listener and no connection is left open.
        """
        with self._life:
            engine = self._engine
            if engine is None:
                return True
            if self._stopping:
                waiter = True
            else:
                waiter = False
                self._stopping = True
        if waiter:
            self._stopped_event.wait()
            return self._last_clean
        engine.closing = True
        engine.listeners_closed = True
        engine.stop_acceptors()
        self._close_shutdown_port()
        me = self._own_connection(engine)
        engine.request_shutdown([c for c in engine.snapshot() if c is not me])
        clean = engine.wait_idle(timeout, exclude=me)
        if not clean:
            rest = [c for c in engine.snapshot() if c is not me]
            log.warning(
                "%d connection(s) still open after the graceful timeout (%ss); interrupting them",
                len(rest),
                timeout,
            )
            engine.interrupt(rest)
            if not engine.wait_idle(INTERRUPT_WAIT, exclude=me):
                log.error(
                    "%d task(s) still running after being interrupted; they are left behind",
                    len(engine.snapshot()) - (me is not None),
                )
        self._last_clean = clean
        self._finish(engine, keep_runtime=me is not None)
        return clean

    def _own_connection(self, engine: Engine) -> Any:
        """The connection whose handler is calling stop(), so stop() does not wait for itself."""
        state = current_task()
        if state is None:
            return None
        return next((c for c in engine.snapshot() if c.state is state), None)

    def _close_shutdown_port(self) -> None:
        with self._life:
            shutdown, self._shutdown_port = self._shutdown_port, None
        if shutdown is not None:
            shutdown.close()

    def _finish(self, engine: Engine, keep_runtime: bool = False) -> None:
        self._close_shutdown_port()
        engine.spare.close()
        with engine.lock:
            self._last_counts = {**engine.counts, "active": 0}
        if self._owns_manager and not keep_runtime:
            try:
                self._manager.runtime.close()
            except Exception:
                log.exception("closing the %s runtime failed", self._manager_name)
        with self._life:
            self._engine = None
            self._stopping = False
            self._stopped_event.set()
        if self._cfg.on_stop is not None:
            try:
                self._cfg.on_stop(self)
            except Exception:
                log.exception("on_stop callback %r raised", self._cfg.on_stop)
        self._hooks().server_stopped(self, self.stats())

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
        self.stop()

    @staticmethod
    def _hooks() -> Any:
        from ._registry import hooks

        return hooks()


# -- settings checks -------------------------------------------------------------------


def _resolve_manager(
    manager: Any, options: dict[str, Any] | None
) -> tuple[TaskManager, bool, str]:
    if manager is None or isinstance(manager, str):
        from ._registry import create_manager

        name = manager or DEFAULT_MANAGER
        return create_manager(name, **(options or {})), True, name
    if options:
        raise ConfigError(
            "manager_options only apply when the manager is given by name; "
            "pass the options to your manager instance instead",
            key="manager_options",
        )
    if not isinstance(manager, TaskManager):
        missing = [
            m
            for m in ("limit", "runtime", "add_task", "remove_task", "stop_task", "all_tasks")
            if not hasattr(manager, m)
        ]
        raise ConfigError(
            f"manager must be a manager name or a TaskManager; {manager!r} lacks {', '.join(missing)}",
            key="manager",
        )
    return manager, False, type(manager).__name__


def _proxy_policy(enabled: Any, trusted: Any, timeout: Any) -> ProxyPolicy | None:
    _check_bool("proxy_protocol", enabled)
    seconds = _check_seconds("proxy_header_timeout", timeout, allow_none=False)
    if not enabled:
        return None
    if isinstance(trusted, str) or not all(isinstance(t, str) for t in trusted):
        raise ConfigError(f"expected a list of networks, got {trusted!r}", key="trusted_proxies")
    try:
        return ProxyPolicy.from_settings(trusted, seconds or 0.0)
    except ValueError as exc:
        raise ConfigError(str(exc), key="trusted_proxies") from None


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", key=key)
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", key=key)
    return value


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> Any:
    if value not in choices:
        raise ConfigError(
            f"expected one of {', '.join(map(repr, choices))}, got {value!r}", key=key
        )
    return value


def _check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"expected a positive integer, got {value!r}", key=key)
    return value


def _check_limit(value: Any) -> int | None:
    return None if value is None else _check_positive_int("max_connections", value)


def _check_seconds(key: str, value: Any, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        expected = "a number of seconds >= 0" + (" or None" if allow_none else "")
        raise ConfigError(f"expected {expected}, got {value!r}", key=key)
    return float(value)


def _check_port(value: Any) -> int | str:
    if isinstance(value, str) and value and not value.isdigit():
        return value  # a service name, resolved when binding
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise ConfigError(
            f"expected a port number 0-65535 or a service name, got {value!r}", key="port"
        )
    return port


def _check_shutdown_port(port: Any, secret: Any, handler: Any) -> int | None:
    if port is None:
        if secret is not None or handler is not None:
            raise ConfigError(
                "only applies with shutdown_port; set shutdown_port (0 picks a free port)",
                key="shutdown_secret" if secret is not None else "shutdown_handler",
            )
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(
            f"expected a port number 0-65535 (0 picks a free port), got {port!r}",
            key="shutdown_port",
        )
    if secret is not None and (not isinstance(secret, str) or not secret or "\n" in secret):
        raise ConfigError(
            "expected a non-empty string without a newline, got "
            + (type(secret).__name__ if not isinstance(secret, str) else "another string"),
            key="shutdown_secret",
        )
    if handler is not None and not callable(handler):
        raise ConfigError(
            f"expected a function f(server, conn) -> bool, got {handler!r}",
            key="shutdown_handler",
        )
    return port


def _check_bind(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(
            f"expected an endpoint string or a list of them, got {value!r}", key="bind"
        )
    return items


_ = ConnectionInfo  # re-exported type used in signatures of hooks
