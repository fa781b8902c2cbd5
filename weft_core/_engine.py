"""The running machinery of one ``Server.run()``: accept loops and connection tasks.

An :class:`Engine` lives from ``run()`` to the end of ``stop()``. Its accept loop
runs as a task of the server's manager, in the manager's runtime; each accepted
connection becomes another task. Both exist in two flavours, plain functions for
sync runtimes (threads, gevent, thread pools) and coroutines for async ones (trio),
which differ only where one calls and the other awaits: policy (limits, errno
handling, back-off, shedding, logging, bookkeeping) is shared below.

Resource handling: a connection's socket is closed by its own task when the handler
returns or raises (unless detached); a connection whose task never started (the
manager was full, or dropped a queued task at stop) is closed by the engine.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from . import _acceptpolicy as policy
from ._connection import ConnectionInfo, format_address, publish, unpublish
from ._errors import ManagerFullError, ServerError, TaskShutdown
from ._listeners import Listener, close_listener
from ._proxy import ProxyHeader, ProxyHeaderError, aread_proxy_header, read_proxy_header
from ._tasks import TaskState, current_task
from ._tls import tls_details

if TYPE_CHECKING:
    from ._protocol import AsyncRuntime, SyncRuntime, TaskManager
    from ._server import Server, _Settings

log = logging.getLogger("weft.server")

#: What ``Server.stats()`` counts, besides ``active``: connections handed to a handler,
#: closed unserved, and the ways a connection can end badly.
COUNTERS = (
    "accepted",
    "refused",
    "handler_errors",
    "tls_errors",
    "peer_errors",
    "proxy_errors",
    "idle_timeouts",
)

#: Linux's IP_TRANSPARENT and IPV6_TRANSPARENT, per family (the socket module
#: names the first only from Python 3.11, the second not at all).
TRANSPARENT = {
    socket.AF_INET: (socket.SOL_IP, getattr(socket, "IP_TRANSPARENT", 19)),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 75),
}

#: While at the limit with on_full="backlog", the acceptor re-checks for a stop this
#: often; it is woken sooner by a slot coming free.
FULL_POLL = 0.1


class Conn(ConnectionInfo):
    """One accepted connection as the engine tracks it, its ConnectionInfo, and its thunk.

    ``sock`` is what the engine closes; ``shut`` is what it shuts down from other
    threads: the same socket, except under TLS, where shutting the TLS object down
    would discard its state, so the runtime hands out the plain descriptor's socket.
    ``addr`` is the socket's peer, which a PROXY header may replace in ``peer``.

    One object per connection, not three: a Conn is the ``ConnectionInfo`` that
    ``current_connection()`` returns, and calling it serves it (``serve(conn)``),
    so it is the thunk its task runs; its ``__name__`` (``weft conn HOST:PORT``)
    is made only when a manager asks. What an idle connection holds limits how many
    a server can hold, and every object tracked by the garbage collector makes its
    collections run sooner.
    """

    __slots__ = ("addr", "options", "serve", "shut", "sock", "started", "state")

    def __init__(
        self, sock: Any, addr: Any, serve: Callable[[Conn], Any], lt: ListenerTask
    ) -> None:
        # ``local`` is the listener's when all its connections share it, else None
        # until the connection's task reads it.
        ConnectionInfo.__init__(self, addr, lt.local)
        self.options = lt.options
        self.serve = serve
        self.sock = sock
        self.shut = sock
        self.addr = addr
        self.state: TaskState | None = None
        self.started = False

    def __call__(self) -> Any:
        # run_task calls this as a plain function (no C-level call in between);
        # an async runtime awaits what it returns.
        return self.serve(self)

    @property
    def __name__(self) -> str:
        return f"weft conn {format_address(self.addr)}"

    def end_input(self) -> None:
        """Phase 2 of a stop: the handler's next read sees end-of-input; writing still works."""
        self.shut.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """Phase 3 of a stop: wake the task from any read or write."""
        self.shut.shutdown(socket.SHUT_RDWR)


class ListenerTask:
    """A listening socket and the acceptor task serving it."""

    __slots__ = ("address", "listener", "local", "native", "options", "task_id")

    def __init__(
        self, listener: Listener, runtime: SyncRuntime | AsyncRuntime, cfg: _Settings
    ) -> None:
        self.listener = listener
        self.address = listener.address  # before adopting: a runtime may take the socket over
        self.local = shared_local_address(listener.sock)
        #: The socket options each of its connections gets: decided once, not per
        #: connection (a gevent socket's ``family`` is a Python property).
        self.options: tuple[tuple[int, int, int], ...] = ()
        if listener.sock.family != socket.AF_UNIX:
            if cfg.nodelay:
                self.options += ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
            if cfg.keepalive:
                self.options += ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
        self.native = runtime.adopt_listener(listener.sock)
        self.task_id: Hashable | None = None

    def wake_with(self, runtime: SyncRuntime | AsyncRuntime) -> Callable[[], None]:
        """The acceptor's shutdown callback: the runtime wakes a pending accept()."""
        return lambda: runtime.wake_listener(self.native)

    def close(self) -> None:
        """Close the native socket and remove a Unix socket file."""
        self.native.close()
        close_listener(self.listener)


def shared_local_address(sock: socket.socket) -> Any:
    """The local address every connection accepted on ``sock`` has, or None if they differ.

    A listener bound to one address (or a Unix path) gives each connection that
    address, so it is read once instead of with a ``getsockname()`` per connection.
    A wildcard listener (``0.0.0.0``, ``::``) or a transparent proxy's (where the local
    address is whatever the client dialled) has no such address.
    """
    try:
        local = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            return local
        level, option = TRANSPARENT.get(sock.family, (socket.SOL_IP, 0))
        if not option or sock.getsockopt(level, option):
            return None
    except OSError:
        return None
    if not isinstance(local, tuple) or ipaddress.ip_address(local[0]).is_unspecified:
        return None
    return local


class Engine:
    """Everything one run of a server holds; see the module docstring."""

    def __init__(self, server: Server, manager: TaskManager, listeners: list[Listener]) -> None:
        self.server = server
        self.manager = manager
        self.runtime = manager.runtime
        cfg = server._cfg
        self.cfg = cfg
        self.handler = cfg.handler
        self.args = cfg.args
        #: Whether connections have a PROXY header or a TLS handshake before the handler.
        self.preamble = cfg.proxy is not None or cfg.tls is not None
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        #: How many wait_idle() calls wait on ``changed``: a connection ending
        #: notifies only then (notify_all costs a microsecond on every connection,
        #: and waking a waiter a thread switch).
        self.idle_waiters = 0
        self.conns: set[Conn] = set()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.slots: Any = (
            self.runtime.slots(cfg.max_connections) if cfg.max_connections is not None else None
        )
        self.spare = policy.SpareDescriptor()
        self.closing = False
        self.error: ServerError | None = None
        self.refuse_log = policy.RateLimitedLog(log)
        self.capacity_log = policy.RateLimitedLog(log)
        self.proxy_log = policy.RateLimitedLog(log)
        self.tls_log = policy.RateLimitedLog(log)
        self.listeners = [ListenerTask(lst, self.runtime, cfg) for lst in listeners]
        self.on_fatal: Callable[[], None] = lambda: None
        self.listeners_closed = False
        self._serve = self._serve_async if self.runtime.kind == "async" else self._serve_sync

    # -- starting ------------------------------------------------------------------

    def start(self) -> None:
        """Add one acceptor task per listener to the manager."""
        for lt in self.listeners:
            thunk = self._acceptor_thunk(lt)
            lt.task_id = self.manager.add_task(thunk)

    def _acceptor_thunk(self, lt: ListenerTask) -> Callable[[], Any]:
        if self.runtime.kind == "async":

            async def run_async() -> None:
                await self._accept_async(lt)

            thunk: Callable[[], Any] = run_async
        else:

            def run_sync() -> None:
                self._accept_sync(lt)

            thunk = run_sync
        thunk.__name__ = f"weft acceptor {lt.address}"
        return thunk

    # -- accepting: the shared policy ------------------------------------------------

    def _accept_failed(
        self, lt: ListenerTask, exc: OSError, state: TaskState | None
    ) -> float | None:
        """Decide what a failed accept means. Returns a pause, 0 to go on, None to stop."""
        if self.closing or (state is not None and state.requested):
            return None
        action = policy.classify_accept_error(exc)
        if action is policy.AcceptAction.SKIP:
            log.debug("accept on %s: %s (skipped)", lt.address, exc)
            return 0.0
        if action is policy.AcceptAction.BACKOFF:
            return -1.0  # caller sheds, then backs off
        self.error = ServerError(
            f"accepting on {lt.address} failed with {exc.__class__.__name__}: {exc}; "
            "the listening socket is unusable, so the server stops"
        )
        log.error("%s", self.error)
        self.on_fatal()
        return None

    def _capacity_pause(
        self, lt: ListenerTask, exc: OSError, backoff: policy.Backoff, shed: int
    ) -> float:
        delay = backoff.next()
        self.capacity_log(
            logging.WARNING,
            "accepting on %s: %s; shed %d waiting client(s), retrying in %.2fs",
            lt.address,
            exc.strerror or exc,
            shed,
            delay,
        )
        return delay

    def _take_slot_now(self) -> bool:
        return self.slots is None or bool(self.slots.acquire(blocking=False))

    def _refuse(self, sock: Any, addr: Any, reason: str) -> None:
        with self.lock:
            self.counts["refused"] += 1
        _close_quietly(sock)
        peer = format_address(addr)
        self.refuse_log(
            logging.WARNING,
            "refused connection from %s: %s",
            peer,
            f"max_connections={self.cfg.max_connections} reached"
            if reason == "full"
            else "the task manager is full",
        )
        self.server._hooks().connection_refused(self.server, peer, reason)

    def _hand_off(self, lt: ListenerTask, sock: Any, addr: Any) -> None:
        """Give an accepted connection (holding a slot) to the manager as a task."""
        conn = Conn(sock, addr, self._serve, lt)
        with self.lock:
            self.conns.add(conn)
            self.counts["accepted"] += 1
        try:
            conn.task_id = self.manager.add_task(conn)
        except ManagerFullError:
            self._finish(conn)
            with self.lock:
                self.counts["accepted"] -= 1
            self._refuse(sock, addr, "manager-full")
        except Exception:
            log.exception(
                "the task manager could not take the connection from %s", format_address(addr)
            )
            self._finish(conn)
            _close_quietly(sock)

    # -- accepting: sync flavour -------------------------------------------------------

    def _accept_sync(self, lt: ListenerTask) -> None:
        rt: SyncRuntime = self.runtime  # type: ignore[assignment]
        state = current_task()
        if state is not None:
            state.on_shutdown(lt.wake_with(rt))
        backoff = policy.Backoff()
        listener = lt.native
        backlog_mode = self.cfg.on_full == "backlog"
        try:
            while not self.closing:
                if backlog_mode and self.slots is not None:
                    while not self.slots.acquire(timeout=FULL_POLL):
                        if self.closing or (state is not None and state.requested):
                            return
                try:
                    sock, addr = listener.accept()
                except OSError as exc:
                    if backlog_mode and self.slots is not None:
                        self.slots.release()
                    pause = self._accept_failed(lt, exc, state)
                    if pause is None:
                        return
                    if pause < 0:
                        shed = self._shed_sync(lt)
                        rt.sleep(self._capacity_pause(lt, exc, backoff, shed))
                    continue
                if backoff.delay:
                    backoff.reset()
                if not backlog_mode and self.slots is not None and not self._take_slot_sync(rt):
                    self._refuse(sock, addr, "full")
                    continue
                self._hand_off(lt, sock, addr)
        finally:
            lt.close()

    def _take_slot_sync(self, rt: SyncRuntime) -> bool:
        if self._take_slot_now():
            return True
        return self.cfg.full_wait > 0 and bool(self.slots.acquire(timeout=self.cfg.full_wait))

    def _shed_sync(self, lt: ListenerTask) -> int:
        shed = 0
        while shed < policy.SHED_BATCH and policy.pending(lt.native.fileno()):
            if not self.spare.release():
                break
            try:
                sock, _ = lt.native.accept()
                sock.close()
                shed += 1
            except OSError:
                break
            finally:
                self.spare.take()
        return shed

    # -- accepting: async flavour ------------------------------------------------------

    async def _accept_async(self, lt: ListenerTask) -> None:
        rt: AsyncRuntime = self.runtime  # type: ignore[assignment]
        state = current_task()
        if state is not None:
            state.on_shutdown(lt.wake_with(rt))
        backoff = policy.Backoff()
        listener = lt.native
        backlog_mode = self.cfg.on_full == "backlog"
        try:
            while not self.closing:
                if backlog_mode and self.slots is not None and not self.slots.acquire_nowait():
                    while not await self.slots.acquire_within(FULL_POLL):
                        if self.closing or (state is not None and state.requested):
                            return
                try:
                    sock, addr = await listener.accept()
                except OSError as exc:
                    if backlog_mode and self.slots is not None:
                        self.slots.release()
                    pause = self._accept_failed(lt, exc, state)
                    if pause is None:
                        return
                    if pause < 0:
                        shed = await self._shed_async(lt)
                        await rt.sleep(self._capacity_pause(lt, exc, backoff, shed))
                    continue
                if backoff.delay:
                    backoff.reset()
                if (
                    not backlog_mode
                    and self.slots is not None
                    and not await self._take_slot_async()
                ):
                    self._refuse(sock, addr, "full")
                    continue
                self._hand_off(lt, sock, addr)
        finally:
            lt.close()

    async def _take_slot_async(self) -> bool:
        if self.slots is None or self.slots.acquire_nowait():
            return True
        return self.cfg.full_wait > 0 and bool(await self.slots.acquire_within(self.cfg.full_wait))

    async def _shed_async(self, lt: ListenerTask) -> int:
        shed = 0
        while shed < policy.SHED_BATCH and policy.pending(lt.native.fileno()):
            if not self.spare.release():
                break
            try:
                sock, _ = await lt.native.accept()
                sock.close()
                shed += 1
            except OSError:
                break
            finally:
                self.spare.take()
        return shed

    # -- serving a connection: shared parts -----------------------------------------

    def _begin(self, conn: Conn) -> Conn | None:
        """Record the task's state and set the socket up; None if the server is stopping.

        The stop reaches the connection through ``conn`` itself (its state's flag, its
        socket's shutdown), so nothing is registered with the task per connection.
        """
        state = current_task()
        conn.started = True
        conn.state = state
        if self.closing:
            return None
        sock = conn.sock
        for level, option, value in conn.options:
            sock.setsockopt(level, option, value)
        if self.cfg.idle_timeout is not None and self.runtime.kind == "sync":
            sock.settimeout(self.cfg.idle_timeout)  # async runtimes apply it in wrap_connection
        if conn.local is None:
            try:
                conn.local = sock.getsockname()
            except OSError:
                pass
        if state is not None:
            conn.task_id = state.id
        return conn

    def _handler_failed(
        self, conn: Conn, handed: Any, info: ConnectionInfo, exc: Exception
    ) -> None:
        state = conn.state
        if state is not None and state.interrupted:
            # We cut it off (its socket shut down, its task cancelled): whatever it
            # raised on the way out - OSError, or a runtime's wrapper such as trio's
            # ClosedResourceError - is our doing, not the handler's fault.
            log.debug("handler for %s cut off by the stop: %r", info.peer_str, exc)
            return
        if isinstance(exc, TimeoutError) and self.cfg.idle_timeout is not None:
            with self.lock:
                self.counts["idle_timeouts"] += 1
            log.info(
                "closed %s: nothing received for %ss (idle_timeout)",
                info.peer_str,
                self.cfg.idle_timeout,
            )
            return
        if _peer_error(exc):
            with self.lock:
                self.counts["peer_errors"] += 1
        else:
            with self.lock:
                self.counts["handler_errors"] += 1
            self.server._hooks().handler_error(self.server, info, exc)
        handler = self.cfg.exception_handler
        try:
            if handler is None:
                default_exception_handler(self.server, handed, exc, info)
            else:
                handler(self.server, handed, exc)
        except Exception:
            log.exception("exception_handler %r raised", handler)

    def _finish(self, conn: Conn) -> None:
        """Forget the connection and free its slot, once."""
        conn.state = None  # let go of the task state as the task ends
        with self.lock:
            present = conn in self.conns
            self.conns.discard(conn)
            if self.idle_waiters and len(self.conns) <= 1:
                # wait_idle() waits for no connection but at most one: waking it
                # sooner would only make it look again (10,000 times in a big stop).
                self.changed.notify_all()
        if present and self.slots is not None:
            self.slots.release()

    # -- serving a connection: sync flavour -------------------------------------------

    def _serve_sync(self, conn: Conn) -> None:
        rt: SyncRuntime = self.runtime  # type: ignore[assignment]
        handed: Any = None
        info: ConnectionInfo | None = None
        try:
            info = self._begin(conn)
            if info is None or (self.preamble and not self._preamble_sync(rt, conn, info)):
                return
            handed = rt.wrap_connection(conn.sock)
            if self.cfg.stream:
                handed = handed.makefile("rwb")
            info.conn = handed
            token = publish(info, conn.state)
            try:
                if self.args:
                    self.handler(handed, *self.args)
                else:
                    self.handler(handed)  # a plain call: f(*args) would add a C-level frame
            except TaskShutdown:
                raise
            except Exception as exc:
                self._handler_failed(conn, handed, info, exc)
            finally:
                unpublish(conn.state, token)
        finally:
            try:
                if info is None or not info.detached:
                    if handed is not None and handed is not conn.sock:
                        _close_quietly(handed)
                    _close_quietly(conn.sock)
            finally:
                self._finish(conn)

    def _preamble_sync(self, rt: SyncRuntime, conn: Conn, info: ConnectionInfo) -> bool:
        """PROXY header, then TLS handshake; False if the connection is to be closed unserved."""
        cfg = self.cfg
        sock = conn.sock
        if cfg.proxy is not None:
            if not self._proxy_trusted(conn, info):
                return False
            deadline = time.monotonic() + cfg.proxy.header_timeout
            sock.settimeout(cfg.proxy.header_timeout)
            try:
                header, leftover = read_proxy_header(
                    sock.recv, deadline_exceeded=lambda: time.monotonic() > deadline
                )
            except (ProxyHeaderError, OSError) as exc:
                return self._proxy_failed(info, exc)
            if not self._proxy_accepted(info, header, leftover):
                return False
            sock.settimeout(cfg.idle_timeout)
        if cfg.tls is not None:
            tls, conn.shut = rt.wrap_tls(sock, cfg.tls)
            conn.sock = tls
            try:
                tls.settimeout(cfg.tls_handshake_timeout)
                tls.do_handshake()
                tls.settimeout(cfg.idle_timeout)
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                return self._tls_failed(info, exc)
            info.tls_version, info.tls_cipher, info.tls_peer_certificate = tls_details(tls)
        return True

    # -- serving a connection: async flavour ------------------------------------------

    async def _serve_async(self, conn: Conn) -> None:
        rt: AsyncRuntime = self.runtime  # type: ignore[assignment]
        handed: Any = None
        info: ConnectionInfo | None = None
        try:
            info = self._begin(conn)
            if info is None:
                return
            handed = await self._preamble_async(rt, conn, info)
            if handed is None:
                return
            info.conn = handed
            token = publish(info, conn.state)
            try:
                if self.args:
                    await self.handler(handed, *self.args)
                else:
                    await self.handler(handed)
            except TaskShutdown:
                raise
            except Exception as exc:
                self._handler_failed(conn, handed, info, exc)
            finally:
                unpublish(conn.state, token)
        finally:
            try:
                if info is None or not info.detached:
                    if handed is not None:
                        await rt.aclose(handed)
                    else:
                        _close_quietly(conn.sock)
            finally:
                self._finish(conn)

    async def _preamble_async(self, rt: AsyncRuntime, conn: Conn, info: ConnectionInfo) -> Any:
        """PROXY header, stream, TLS handshake; the stream to hand over, or None to close."""
        cfg = self.cfg
        sock = conn.sock
        if cfg.proxy is not None:
            if not self._proxy_trusted(conn, info):
                return None
            try:
                header, leftover = await rt.within(
                    cfg.proxy.header_timeout, lambda: aread_proxy_header(sock.recv)
                )
            except (ProxyHeaderError, OSError) as exc:
                return self._proxy_failed(info, exc) or None
            if not self._proxy_accepted(info, header, leftover):
                return None
        stream = rt.wrap_connection(sock, cfg.idle_timeout)
        if not cfg.nodelay and sock.family != socket.AF_UNIX:
            # trio.SocketStream turns TCP_NODELAY on by itself; honour nodelay=False.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        if cfg.tls is not None:
            stream = rt.wrap_tls(stream, cfg.tls)
            failures: tuple[type[BaseException], ...] = (OSError, ValueError, *rt.tls_errors)
            try:
                await rt.within(cfg.tls_handshake_timeout, stream.do_handshake)
            except failures as exc:
                self._tls_failed(info, exc)
                await rt.aclose(stream)
                return None
            info.tls_version, info.tls_cipher, info.tls_peer_certificate = tls_details(stream)
        return stream

    # -- PROXY protocol and TLS: shared parts ------------------------------------------

    def _proxy_trusted(self, conn: Conn, info: ConnectionInfo) -> bool:
        proxy = self.cfg.proxy
        assert proxy is not None
        if proxy.trusts(conn.addr):
            return True
        return self._proxy_failed(
            info, ProxyHeaderError("not a trusted proxy"), reason="untrusted"
        )

    def _proxy_accepted(self, info: ConnectionInfo, header: ProxyHeader, leftover: bytes) -> bool:
        if leftover:  # read_proxy_header never reads past the header; be sure of it
            return self._proxy_failed(info, ProxyHeaderError("bytes past the header were read"))
        info.proxy_peer = info.peer
        if header.command == "PROXY" and isinstance(header.source, tuple):
            info.peer = header.source
            info.local = header.destination
        return True

    def _proxy_failed(
        self, info: ConnectionInfo, exc: BaseException, reason: str = "proxy"
    ) -> bool:
        with self.lock:
            self.counts["proxy_errors"] += 1
        self.proxy_log(
            logging.WARNING,
            "closed connection from %s unserved: PROXY header: %s",
            info.peer_str,
            getattr(exc, "reason", None) or exc or exc.__class__.__name__,
        )
        self.server._hooks().connection_refused(self.server, info.peer_str, reason)
        return False

    def _tls_failed(self, info: ConnectionInfo, exc: BaseException) -> bool:
        with self.lock:
            self.counts["tls_errors"] += 1
        self.tls_log(
            logging.WARNING,
            "TLS handshake with %s failed: %s",
            info.peer_str,
            str(exc) or exc.__class__.__name__,
        )
        self.server._hooks().connection_refused(self.server, info.peer_str, "tls")
        return False

    # -- stopping ------------------------------------------------------------------------

    def stop_acceptors(self) -> None:
        """Phase 1: close every listener by stopping its acceptor task."""
        for lt in self.listeners:
            if lt.task_id is not None:
                # Never shutdown() a listener: it may be shared with other processes
                # (workers, systemd). Thread runtimes wake accept() with a pipe;
                # event-loop managers interrupt the acceptor (kill, cancel) at once.
                self.manager.stop_task(lt.task_id, timeout=0)
            # The acceptor closes its listener on the way out; one that never ran
            # (a manager may drop a queued task) must not leave it open.
            lt.close()

    def snapshot(self) -> list[Conn]:
        """The connections open now."""
        with self.lock:
            return list(self.conns)

    def request_shutdown(self, conns: list[Conn]) -> None:
        """Phase 2: flag every connection's task and end its input.

        In the runtime's loop thread when it has one (``run_in_loop``): one batch
        there, rather than a GIL hand-off with the loop for every connection.
        """
        run_in_loop = getattr(self.runtime, "run_in_loop", None)
        if conns and run_in_loop is not None:
            run_in_loop(lambda: self._end_input(conns))
        else:
            self._end_input(conns)

    @staticmethod
    def _end_input(conns: list[Conn]) -> None:
        for conn in conns:
            state = conn.state  # read once: the task may finish and clear it meanwhile
            if state is not None:
                state.request_shutdown()
            _shutdown_quietly(conn.end_input)

    def wait_idle(self, timeout: float | None, exclude: Conn | None = None) -> bool:
        """Wait until no connection (but ``exclude``) is open; False on timeout."""

        def idle() -> bool:
            return all(c is exclude for c in self.conns)

        with self.changed:
            self.idle_waiters += 1
            try:
                return self.changed.wait_for(idle, timeout)
            finally:
                self.idle_waiters -= 1

    def interrupt(self, conns: list[Conn]) -> None:
        """Phase 3: interrupt every remaining task; close sockets of tasks that never ran."""
        for conn in conns:
            state = conn.state
            if state is not None:
                state.interrupt()  # marks whatever the handler raises next as our doing
            _shutdown_quietly(conn.abort)
        for conn in conns:
            if conn.task_id is not None:
                self.manager.stop_task(conn.task_id, timeout=0)
            if not conn.started:
                _close_quietly(conn.sock)
                self._finish(conn)


def _peer_error(exc: BaseException) -> bool:
    """The peer reset or vanished: a ConnectionError, or a runtime's wrapper of one.

    trio reports a reset as ``trio.BrokenResourceError`` caused by the
    ConnectionResetError; that is the peer's doing too, not the handler's.
    """
    return isinstance(exc, ConnectionError) or isinstance(exc.__cause__, ConnectionError)


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except OSError:
        pass


def _shutdown_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except OSError:
        pass


def default_exception_handler(
    server: Server, conn: Any, exc: BaseException, info: ConnectionInfo | None = None
) -> None:
    """Log a handler's exception: peer resets in one line, anything else with its traceback."""
    peer = info.peer_str if info is not None else "?"
    if _peer_error(exc):
        log.info("connection from %s ended by the peer: %s", peer, exc.__class__.__name__)
    else:
        log.error("handler for %s raised %s", peer, exc.__class__.__name__, exc_info=exc)
