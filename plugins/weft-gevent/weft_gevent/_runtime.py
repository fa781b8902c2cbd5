"""GeventRuntime, the I/O the server does inside gevent tasks, and GeventSocket.

The server's accept loop and connection wrapper are written once in ``weft_core``;
this runtime gives them gevent's socket, semaphore and sleep. Sockets are made in
the manager's hub thread (a gevent socket belongs to the hub of the thread that made
it), so :meth:`GeventRuntime.adopt_listener` hands the listening socket's descriptor
over to that thread.

:class:`GeventSocket` is a gevent socket with two stdlib behaviours that a server
stopping from another thread depends on; everything else is gevent's.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar, cast

import gevent
import gevent.lock
import gevent.socket
from gevent.exceptions import ConcurrentObjectUseError
from greenlet import GreenletExit, getcurrent

from weft_core import HandlerKind, SyncSlots, TaskShutdown

from ._hub import HubLink, HubOwner, real_get_ident, report_blocked_hub

__all__ = ["GeventRuntime", "GeventSocket"]

#: How long ``close()`` gives the hub to end the calls ``spawn_soon`` started (it kills
#: them, as trio's and asyncio's closes cancel theirs): a turn of the loop, unless
#: a call blocks the hub, which the stop's own bound then reports.
END_CALLS_WAIT = 1.0

_S = TypeVar("_S")  # the socket given: a GeventSocket, or gevent's SSLSocket under TLS


class GeventSocket(gevent.socket.socket):
    """A gevent socket that any OS thread may shut down or close.

    - ``shutdown(SHUT_RD)`` behaves as the stdlib's: a greenlet waiting in ``recv``
      gets ``b""`` (end of input) and one waiting in ``accept`` gets ``EINVAL``.
      gevent's own ``shutdown`` instead throws "File descriptor was closed in
      another greenlet" (``EBADF``) into the waiter, and does so through a loop
      callback that is not thread-safe. The plain system call needs no help: the
      descriptor becomes readable and the hub's poller wakes the waiter.
    - ``close()`` from a thread other than the socket's hub runs in the hub's thread
      and returns once the descriptor is closed. gevent's ``close`` touches the
      loop's watchers, which is unsafe from another thread, and a greenlet waiting
      on the socket would neither wake nor let the descriptor close.

    - ``recv`` and ``recv_into`` (what a handler parks in while its connection is
      idle) wait for input as gevent's do, through fewer C calls: an idle
      connection's greenlet keeps a copy of its C stack, and gevent's wait goes
      through four compiled functions and a ``Waiter`` between ``recv`` and the hub.
      Same outcome: data, ``b""``, the error of a socket closed by another
      greenlet, and with a timeout set, gevent's own wait with its timer.

    ``accept()`` returns GeventSockets as well.
    """

    __slots__ = ()

    def accept(self) -> tuple[GeventSocket, Any]:
        """Accept a connection; waits cooperatively only when none is pending.

        As gevent's own: the non-blocking ``accept`` is tried first, so a busy
        listener hands over its whole backlog without a trip through the loop.
        """
        this: Any = self  # gevent's private attributes; no cast() call per connection
        while True:
            try:
                fd, address = this._sock._accept()  # what gevent's own _accept() calls
                break
            except BlockingIOError:
                if this.timeout == 0.0:
                    raise
            _wait_readable(this)
        # The plain socket's attributes: gevent's own family/type are Python properties.
        sock = this._sock
        return GeventSocket(sock.family, sock.type, sock.proto, fileno=fd), address

    def recv(self, *args: Any) -> bytes:
        """Receive as gevent does: try at once, else wait for input cooperatively."""
        this: Any = self
        while True:
            try:
                return this._sock.recv(*args)  # type: ignore[no-any-return]
            except BlockingIOError:
                if this.timeout == 0.0:
                    raise
            _wait_readable(this)

    def recv_into(self, *args: Any) -> int:
        """Receive into a buffer as gevent does (``makefile()`` readers use it)."""
        this: Any = self
        while True:
            try:
                return this._sock.recv_into(*args)  # type: ignore[no-any-return]
            except BlockingIOError:
                if this.timeout == 0.0:
                    raise
            _wait_readable(this)

    def shutdown(self, how: int) -> None:
        """Shut down one or both halves, as the stdlib does; safe from any thread."""
        this: Any = self
        this._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket; from another OS thread, the close runs in the hub's."""
        this: Any = self
        hub = this.hub
        if (
            hub is None
            or hub.loop is None
            or real_get_ident() == hub.thread_ident
            or not HubLink(hub).run(_close_in_hub, self)[0]
        ):
            # In the hub's thread, or after the hub is gone (nothing to wake then).
            super().close()


def _wait_readable(sock: Any) -> None:
    """Park the calling greenlet until ``sock`` is readable (or closed by another greenlet).

    gevent's ``_wait`` without its layers: the read watcher calls this greenlet's
    ``switch`` directly, where gevent's would call a ``Waiter``'s. gevent's
    ``cancel_wait`` (another greenlet closing the socket) throws into the
    greenlet it finds as the callback's ``__self__``, as with a Waiter. A stray
    switch is harmless here: the caller tries the socket again and waits anew.
    """
    watcher = sock._read_event
    if watcher is None or sock.timeout is not None:
        sock._wait(watcher)  # closed meanwhile, or a timer to run: gevent's own wait
        return
    if watcher.callback is not None:
        raise ConcurrentObjectUseError(
            f"This socket is already used by another greenlet: {watcher.callback!r}"
        )
    watcher.start(getcurrent().switch)
    try:
        sock.hub.switch()
    finally:
        watcher.stop()


def _close_in_hub(sock: GeventSocket) -> None:
    gevent.socket.socket.close(sock)
    # A greenlet waiting on the socket is woken, and the descriptor closed, by a
    # loop callback gevent has just queued; one turn of the loop lets it run, so
    # the descriptor is gone when the caller's close() returns.
    gevent.sleep(0)


class _Soon:
    """One hub's queue of thunks from other threads, and whether a wake-up is on its way.

    Lock-free, so that a signal handler that interrupted ``add`` in its own thread
    can add too: ``deque.append`` and ``popleft`` are atomic, and a caller appends
    before it reads the flag while the hub clears the flag before it drains, so a
    caller that sees a wake-up on its way is sure that wake-up takes its thunk. Two
    callers may both wake the hub; the second wake-up finds less, or nothing, to do.
    """

    __slots__ = ("link", "queued", "run", "waking")

    def __init__(self, link: HubLink, run: Callable[[Callable[[], object]], None]) -> None:
        self.link = link
        self.run = run
        self.queued: collections.deque[Callable[[], object]] = collections.deque()
        self.waking = False

    def add(self, thunk: Callable[[], object]) -> None:
        """Queue ``thunk``; wake the hub unless a wake-up is on its way; any thread."""
        self.queued.append(thunk)
        if self.waking:
            return
        self.waking = True
        self.link.call_soon(self.start)

    def start(self) -> None:
        """Spawn what was queued before this wake-up; a callback of the hub's loop.

        Only that much: what callers add meanwhile comes with a wake-up of its own,
        so a flood of submits cannot keep the hub in here.
        """
        self.waking = False
        for _ in range(len(self.queued)):
            gevent.spawn_raw(self.run, self.queued.popleft())


def _make_socket(family: int, type_: int, proto: int, fd: int) -> GeventSocket:
    return GeventSocket(family, type_, proto, fileno=fd)


class GeventRuntime:
    """gevent's sockets, semaphore and sleep, in one :class:`GeventManager`'s hub.

    Handlers receive a :class:`GeventSocket`. :meth:`close` stops the hub thread
    the manager started, once no task is left.
    """

    kind: HandlerKind = "sync"
    conn_is_stream = False
    #: A kill with gevent's default (the manager's own kill is TaskShutdown).
    cancellations: tuple[type[BaseException], ...] | None = (GreenletExit,)

    def __init__(self, hubs: HubOwner) -> None:
        self._hubs = hubs
        #: Thunks other threads gave spawn_soon, waiting for one hub to start them.
        self._soon: _Soon | None = None
        #: The greenlets of spawn_soon's calls still running; touched in the hub only.
        self._calls: set[Any] = set()

    def spawn_soon(self, thunk: Callable[[], object]) -> None:
        """Start ``thunk`` in a greenlet of the hub (``Server.submit``); from any thread.

        In the hub's thread it is spawned at once. From another thread it is
        queued, and only a call that finds no wake-up on its way wakes the hub (one
        ``run_callback_threadsafe``): one wake-up spawns every thunk queued until
        the hub drains the queue.

        The queue is the hub's: a wake-up sent to a hub that a stop ended never
        runs, and a queue that outlived it was never empty again, so no later call
        woke the next hub (a Server run again after a stop ran no submitted call,
        silently). A new hub starts a new queue; what waited for the old one was
        the stopped server's, whose futures its stop cancelled.

        No lock: a signal handler calling ``submit()`` while its thread is in here
        deadlocked on one (:class:`_Soon`).
        """
        link = self._hubs.link
        if link is None:
            raise RuntimeError("weft-gevent: no hub runs (the server is not running)")
        if link.is_current():
            gevent.spawn_raw(self._run_call, thunk)
            return
        soon = self._soon
        if soon is None or soon.link is not link:
            soon = self._soon = _Soon(link, self._run_call)
        soon.add(thunk)

    def _run_call(self, thunk: Callable[[], object]) -> None:
        """Run a ``spawn_soon`` thunk in its greenlet, known to :meth:`close` while it runs."""
        me = getcurrent()
        self._calls.add(me)
        try:
            thunk()
        except TaskShutdown:
            pass  # close() ended it; the thunk has told its caller
        finally:
            self._calls.discard(me)

    def _end_calls(self) -> None:
        """Kill every call ``spawn_soon`` started that still runs; in the hub.

        A submitted call parked on something of the hub (an event nobody sets) was
        left in a destroyed hub, its ``finally`` never run, where trio and asyncio
        cancel theirs as their runtime closes.
        """
        for greenlet in list(self._calls):
            gevent.kill(greenlet, TaskShutdown)
        gevent.sleep(0)  # one turn of the loop: the kills are thrown, the calls unwind

    def __repr__(self) -> str:
        return f"<GeventRuntime {self._hubs!r}>"

    def adopt_listener(self, sock: socket.socket) -> GeventSocket:
        """A :class:`GeventSocket` owning ``sock``'s descriptor, made in the hub's thread.

        ``sock`` is detached and must not be used afterwards. ``accept()`` on the
        result, called in a task, waits cooperatively and returns GeventSockets.
        """
        family, type_, proto = sock.family, sock.type, sock.proto
        link = self._hubs.acquire()  # start the hub before the descriptor changes hands
        try:
            return link.call(_make_socket, int(family), int(type_), proto, sock.detach())
        finally:
            self._hubs.release()

    def wake_listener(self, listener: Any) -> None:
        """Nothing to do: the manager interrupts the acceptor (kills it with TaskShutdown) when it stops."""

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the hub's thread (a stop's batch of shutdowns); True once it has.

        A hub that does not answer within ``timeout`` is blocked by a greenlet that
        never yields (a blocking call that is not gevent's): that greenlet's stack is
        logged, since it is what the hub's thread is running now, and False returned.
        An ``fn`` that began and waits cooperatively (a ``put()`` on a full queue)
        is False too, and not blamed on the hub.
        """
        began: list[bool] = []

        def call() -> None:
            began.append(True)
            fn()

        ran, link = self._hubs.run_within(call, timeout)
        if not ran and link is not None and not began:  # begun, it waits in the hub
            report_blocked_hub(link, timeout)
        return ran

    def slots(self, n: int) -> SyncSlots:
        """A ``gevent.lock.Semaphore`` of ``n``, for use inside the hub's tasks."""
        return cast(SyncSlots, gevent.lock.Semaphore(n))

    def sleep(self, seconds: float) -> None:
        """``gevent.sleep``: suspend the calling greenlet."""
        gevent.sleep(seconds)

    def wrap_connection(self, sock: _S) -> _S:
        """The accepted GeventSocket itself (gevent's SSLSocket on a TLS server)."""
        return sock

    def wrap_tls(self, sock: GeventSocket, context: ssl.SSLContext) -> tuple[Any, Any]:
        """A cooperative server-side gevent SSLSocket (not yet handshaken), and its raw socket.

        Works with a stdlib ``SSLContext``: gevent's SSLSocket takes it as
        ``_context``. The second item is the plain ``_socket.socket`` under it, for
        shutting the descriptor down from any thread without touching TLS state.
        """
        try:
            tls = _handshake_bounded_class()(
                sock=sock,
                server_side=True,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,  # the class's read tells a reset from an end
                _context=context,
            )
        except OSError as exc:
            _close_half_made(exc)
            raise
        return tls, cast(Any, tls)._sock

    def close(self) -> None:
        """End the calls spawn_soon started, then stop the manager's own hub thread if no task is left.

        A later use restarts it.
        """
        if self._calls:
            self._hubs.run_within(self._end_calls, END_CALLS_WAIT)
        self._hubs.close()


_BoundedSSLSocket: type | None = None


def _handshake_bounded_class() -> type:
    """The SSLSocket of gevent, with a handshake bounded as one deadline and reads that tell a reset.

    - gevent's own ``do_handshake`` gives each wait for the peer the socket's whole
      timeout, so a ClientHello sent a byte at a time, each within the timeout,
      holds the handshake open for ever; the stdlib's (the threads manager's) counts
      the timeout for the whole handshake.
    - CPython's ``ssl`` reports a reset met inside OpenSSL's read as an end of input
      (``SSLEOFError``, its ``ECONNRESET`` lost), which ``suppress_ragged_eofs``
      turns into ``b""``: a request cut by a reset would look whole. Made with
      ``suppress_ragged_eofs=False``, ``read`` (which ``recv``, ``recv_into`` and
      ``makefile`` use) takes an end without close_notify as the end of input, as
      before, unless the kernel holds the connection as reset: that raises
      ``ConnectionResetError``, as on a plain socket.

    Made on first use: gevent.ssl is imported only for TLS.
    """
    global _BoundedSSLSocket
    if _BoundedSSLSocket is None:
        import gevent.ssl

        class BoundedSSLSocket(gevent.ssl.SSLSocket):
            #: Set once a read ended as an end of input: the kernel is asked once, since
            #: asking clears the pending error that told the end from a reset.
            _weft_ended = False

            def do_handshake(self, block: bool = False) -> None:
                seconds = self.gettimeout()
                if not seconds:  # None (blocking) or 0 (non-blocking): gevent's own
                    super().do_handshake()
                    return
                expired = TimeoutError(f"the TLS handshake took longer than {seconds:g}s")
                with gevent.Timeout(seconds, expired):
                    super().do_handshake()

            def read(self, nbytes: int = 2014, buffer: Any = None) -> Any:
                try:
                    return super().read(nbytes, buffer)
                except ssl.SSLEOFError:
                    pass  # raised past this block: no SSLError behind the reset
                if not self._weft_ended and _reset_by_peer(self):
                    raise ConnectionResetError(
                        errno.ECONNRESET, "the peer reset the TLS connection"
                    )
                self._weft_ended = True
                return b"" if buffer is None else 0

        _BoundedSSLSocket = BoundedSSLSocket
    return _BoundedSSLSocket


#: ``(IPPROTO_TCP, TCP_INFO)``, Linux's; and ``tcpi_state`` once a reset ended the
#: connection (``TCP_CLOSE``). A half-closed one is ``CLOSE_WAIT``, one whose input
#: a stop ended still ``ESTABLISHED``.
_TCP_INFO = (socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", None))
_TCP_CLOSE = 7


def _reset_by_peer(sock: Any) -> bool:
    """True if the kernel holds ``sock``'s TCP connection as reset; False if it cannot tell."""
    level, option = _TCP_INFO
    if option is None:
        return False
    try:
        info = sock.getsockopt(level, option, 8)
        if not info or info[0] != _TCP_CLOSE:
            return False
        # A reset after the peer's FIN leaves EPIPE pending (Linux's tcp_reset() in
        # CLOSE_WAIT), not ECONNRESET: it answered OpenSSL's alert for an end without
        # close_notify (an application's context without OP_IGNORE_UNEXPECTED_EOF),
        # and the peer had ended its side: an end of input, not a reset.
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.EPIPE)
    except (OSError, ValueError, TypeError):
        return False


def _close_half_made(exc: BaseException) -> None:
    """Close the descriptor a gevent SSLSocket that failed to be made holds.

    Its ``__init__`` takes the socket's descriptor (the socket is detached), then
    checks that it is connected; on a socket the peer reset it raises without
    closing the plain socket under it, so the descriptor stayed open until a
    collection found it (with a ResourceWarning). The half-made SSLSocket is the
    ``self`` of a frame of the traceback.
    """
    import gevent.ssl

    tb = exc.__traceback__
    while tb is not None:
        made = tb.tb_frame.f_locals.get("self")
        if isinstance(made, gevent.ssl.SSLSocket):
            raw = getattr(made, "_sock", None)
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.close()
            return
        tb = tb.tb_next
