"""AsyncioRuntime: the asyncio-native operations weft's server needs (``AsyncRuntime``).

The server's one accept loop and one connection wrapper, written once in
``weft_core``, run on :class:`~weft_asyncio.AsyncioManager`'s loop through this
object: it adopts the listening socket (:class:`AsyncioListener`, accepting with
the loop's reader callbacks), counts connection slots (:class:`AsyncioSlots`), and
wraps each accepted socket in an :class:`~weft_asyncio.AsyncioStream`, which is what
a handler receives.

What does not live here: the loop and the tasks (``_manager.py``), the stream
(``_stream.py``). Every coroutine below runs on the manager's loop; ``release``,
``run_in_loop`` and ``close`` may be called from anywhere.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import math
import os
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from weft_core import AsyncRuntime, HandlerKind

from ._stream import _DONTWAIT, AsyncioStream

if TYPE_CHECKING:
    from ._manager import AsyncioManager

__all__ = ["AsyncioListener", "AsyncioRuntime", "AsyncioSlots", "AsyncioSocket"]

T = TypeVar("T")

#: How many connections the acceptor takes in a row before it lets other tasks run:
#: ``asyncio.start_server``'s own batch (its accept callback takes up to ``backlog``,
#: 100 by default, per wake-up). Under a flood, the handlers still get the loop.
ACCEPT_BURST = 100


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable, through the running loop's reader callbacks."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _ready, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def _ready(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# socket.socket's ``family`` and ``type`` properties build an enum member on every
# read (about a microsecond each); these tables give the same members for a
# dictionary lookup, once per socket (``AsyncioSocket`` keeps them).
_FAMILIES = {int(f): f for f in socket.AddressFamily}
_KINDS = {int(k): k for k in socket.SocketKind}
_raw_family = _socket.socket.family
_raw_type = _socket.socket.type


#: ``(IPPROTO_TCP, TCP_INFO)``: Linux's per-connection counters (None elsewhere).
_TCP_INFO = (socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", None))
#: Room for the struct as any kernel fills it (it grows; the kernel copies what fits).
_TCP_INFO_SIZE = 512


class AsyncioSocket(socket.socket):
    """An accepted connection's socket: a ``socket.socket``, what ``stream.socket`` is.

    While the server reads its preamble (a PROXY header) it is an ``_Accepted``,
    whose ``recv`` is awaited, as on a trio socket. The descriptor is made non-blocking by
    whatever makes the stream's transport (asyncio's loop through the stream, uvloop
    by itself), or by the stream's ``socket`` if a handler takes it first; not at
    accept: on uvloop that would be a second ``ioctl`` per connection.

    ``family`` and ``type`` are slots, set once (see :meth:`__init__`). Three more
    of its own: ``peer``, the address ``accept`` returned, which
    ``getpeername()`` no longer gives once the client has reset (the stream's
    ``get_extra_info("peername")`` falls back on it); ``nodelay``, its
    ``TCP_NODELAY`` as last set (through :meth:`setsockopt`) or inherited from the
    listener, which the stream restores after a transport that turns it on (None:
    unknown, read from the kernel); and ``last_info``, the kernel's ``TCP_INFO`` as
    the transport closed it after a reset, which ``getsockopt`` answers once the
    descriptor is gone (the server reads the connection's byte counts from it at
    the end).
    """

    __slots__ = ("family", "last_info", "nodelay", "peer", "type")
    family: socket.AddressFamily
    type: socket.SocketKind
    peer: Any
    nodelay: bool | None
    last_info: bytes

    def __init__(
        self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
    ) -> None:
        super().__init__(family, type, proto, fileno)
        # Kept in slots: socket.socket's ``family`` and ``type`` properties build an
        # enum member on every read, and the server, the stream and uvloop read them
        # several times per connection.
        raw: int = _raw_family.__get__(self)
        self.family = _FAMILIES.get(raw) or socket.AddressFamily(raw)
        raw = _raw_type.__get__(self)
        self.type = _KINDS.get(raw) or socket.SocketKind(raw)

    def setsockopt(self, level: int, option: int, value: Any, *optlen: int) -> None:
        """``socket.setsockopt``, keeping ``TCP_NODELAY``'s value in ``nodelay``."""
        socket.socket.setsockopt(self, level, option, value, *optlen)
        if option == socket.TCP_NODELAY and level == socket.IPPROTO_TCP:
            # An int is the value; bytes (or a length) are the kernel's to read.
            self.nodelay = bool(value) if isinstance(value, int) and not optlen else None

    def keep_last_info(self) -> None:
        """Keep the kernel's ``TCP_INFO`` for after the descriptor is closed (a reset).

        The socket becomes an :class:`_EndedSocket`, whose ``getsockopt`` answers it
        then: every other socket keeps the plain, compiled ``getsockopt``.
        """
        level, option = _TCP_INFO
        if option is None or type(self) is not AsyncioSocket:
            return
        if _raw_family.__get__(self) in (socket.AF_INET, socket.AF_INET6):
            try:
                self.last_info = socket.socket.getsockopt(self, level, option, _TCP_INFO_SIZE)
            except OSError:
                return
            self.__class__ = _EndedSocket


class _Accepted(AsyncioSocket):
    """A socket as accepted, before its stream: ``recv`` is awaited.

    The server's preamble (a PROXY header) reads it so, on any async runtime; it
    asks the kernel not to wait (``MSG_DONTWAIT``), the descriptor being non-blocking
    only once the stream's transport is made.
    :meth:`AsyncioRuntime.wrap_connection` makes it a plain :class:`AsyncioSocket`
    again: the handler's ``stream.socket`` is what asyncio's own APIs take
    (``loop.sock_recv``, ``asyncio.open_connection(sock=...)`` after ``detach()``).
    """

    __slots__ = ()

    async def recv(self, bufsize: int, flags: int = 0) -> bytes:  # type: ignore[override]
        """Receive up to ``bufsize`` bytes, waiting on the loop for them."""
        flags |= _DONTWAIT
        while True:
            try:
                return socket.socket.recv(self, bufsize, flags)
            except (BlockingIOError, InterruptedError):
                await _readable(self.fileno())


class _EndedSocket(AsyncioSocket):
    """An accepted socket its transport closed after a reset (:meth:`keep_last_info`)."""

    __slots__ = ()

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> Any:
        """``socket.getsockopt``; ``TCP_INFO`` as it was at the end, once closed."""
        try:
            if buffersize:
                return socket.socket.getsockopt(self, level, option, buffersize)
            return socket.socket.getsockopt(self, level, option)
        except OSError:
            if (level, option) != _TCP_INFO or self.fileno() != -1:
                raise
            return self.last_info[:buffersize] if buffersize else self.last_info


class AsyncioListener(AsyncioSocket):
    """The listening socket, non-blocking, whose ``accept`` is awaited on the loop.

    ``server.socket`` is this object: a socket for ``getsockname``, ``getsockopt``
    and ``fileno``.

    The loop watches it the way ``asyncio.start_server`` watches its own: one reader
    callback, registered by the first ``accept`` that has to wait and kept between
    accepts, so a connection arriving while the acceptor waits costs no
    ``epoll_ctl`` pair. It is dropped when nobody is accepting (an acceptor that
    went away, a pause), at the callback's first call then, or on ``close`` in the
    loop's thread; an ``accept`` cancelled while waiting drops it at once.
    """

    __slots__ = ("_burst", "_kind", "_waiter", "_watched")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.setblocking(False)
        self._burst = 0
        #: What each accepted socket is made with, read once.
        self._kind = (self.family, self.type, self.proto)
        #: The TCP_NODELAY each accepted socket inherits (Linux copies it), read once.
        self.nodelay = None
        if self.family in (socket.AF_INET, socket.AF_INET6) and sys.platform == "linux":
            self.nodelay = bool(self.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        #: The future an ``accept`` waits on while the backlog is empty, else None.
        self._waiter: asyncio.Future[None] | None = None
        #: The loop and descriptor of the registered reader callback, or None.
        self._watched: tuple[asyncio.AbstractEventLoop, int] | None = None

    async def accept(self) -> tuple[AsyncioSocket, Any]:  # type: ignore[override]
        """Wait for a connection; return its socket (non-blocking) and the peer's address.

        Raises OSError as ``accept(2)`` fails (``EMFILE`` ...). Takes up to
        ``ACCEPT_BURST`` waiting connections in a row, then lets the loop run others.
        """
        if self._burst >= ACCEPT_BURST:
            self._burst = 0
            await asyncio.sleep(0)
        while True:
            try:
                fd, address = self._accept()  # type: ignore[attr-defined]
                break
            except (BlockingIOError, InterruptedError):
                self._burst = 0
                await self._readable()
        self._burst += 1
        sock = _Accepted(*self._kind, fileno=fd)
        sock.peer = address
        sock.nodelay = self.nodelay
        return sock, address

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        if self._watched is None or self._watched[0] is not loop:
            self._unwatch()
            fd = self.fileno()
            loop.add_reader(fd, self._on_readable)
            self._watched = (loop, fd)
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        except BaseException:
            self._unwatch()  # cancelled: a stop, a pause; nobody may accept again
            raise
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._unwatch()  # a client waits and nobody accepts: no wake-up per turn
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        watched, self._watched = self._watched, None
        if watched is not None:
            try:
                watched[0].remove_reader(watched[1])
            except OSError:  # closed from another thread meanwhile: the kernel dropped it
                pass

    def close(self) -> None:
        """Close the socket; in the loop's thread, drop its reader callback first.

        From another thread (a stop's fallback while the loop is blocked) the loop
        still watches the descriptor, and the loop may be the application's:
        closed, its number would go to the next socket the application opens, and
        the stale watch would take that one's events. So the listening socket is
        closed by putting a stand-in on its number (no client is accepted from
        then on), and the stand-in is closed on the loop, once the watch is dropped.
        """
        watched = self._watched
        if watched is not None and _in_loop(watched[0]):
            self._unwatch()
        elif watched is not None and self.fileno() != -1 and self._stand_in(watched[0]):
            return
        super().close()

    def _stand_in(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Close the listening socket under a stand-in, closed in turn on ``loop``."""
        try:
            with socket.socket() as stand_in:
                os.dup2(stand_in.fileno(), self.fileno())
            loop.call_soon_threadsafe(self.close)
        except OSError:  # no descriptor to spare: closed as it is
            return False
        except RuntimeError:  # the loop is closed: nothing watches any more
            return False
        return True


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class AsyncioSlots:
    """Connection slots: taken on the loop, released from the loop or any thread."""

    __slots__ = ("_free", "_lock", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<AsyncioSlots free={self._free}>"

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free; True if taken."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            return False

    async def acquire_within(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a slot; True if taken."""
        if self.acquire_nowait():
            return True
        if timeout is not None and (math.isnan(timeout) or timeout <= 0):
            return False
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._free > 0:
                    self._free -= 1
                    return True
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
            timer = None if deadline is None else loop.call_at(deadline, _ready, waiter)
            try:
                await waiter
            except BaseException:
                # Cancelled: if a release chose this waiter (it is out of the queue),
                # its wake-up goes to the next one, or the free slot waited unclaimed
                # while that one slept to its deadline (for ever, with None).
                with self._lock:
                    chosen = waiter not in self._waiters
                    passed_on = self._waiters.popleft() if chosen and self._waiters else None
                if passed_on is not None:
                    _wake(passed_on)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
            if deadline is not None and loop.time() >= deadline:
                return self.acquire_nowait()

    def release(self) -> None:
        """Free one slot and wake the longest waiter; safe from any thread."""
        with self._lock:
            self._free += 1
            waiter = self._waiters.popleft() if self._waiters else None
        if waiter is not None:
            _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    """Resolve ``waiter`` on its own loop, from that loop's thread or any other."""
    loop = waiter.get_loop()
    if _in_loop(loop):
        _ready(waiter)
        return
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_ready, waiter)


class AsyncioRuntime(AsyncRuntime):
    """Non-blocking sockets on the manager's loop, :class:`AsyncioStream` connections.

    Resource handling: :meth:`close` ends the manager's own loop thread (cancelling
    any task still there) and joins it; on an application's loop it only lets go of
    it. The next ``add_task`` picks a loop again.
    """

    kind: HandlerKind = "async"
    #: A handler gets an AsyncioStream, already a stream: ``Server(stream=True)`` is refused.
    conn_is_stream = True
    #: A failed handshake raises ssl.SSLError or ConnectionError: OSErrors already.
    tls_errors: tuple[type[BaseException], ...] = ()
    #: ``Task.cancel()``'s: the manager's stop_task, or the loop's end.
    cancellations: tuple[type[BaseException], ...] | None = (asyncio.CancelledError,)

    def __init__(self, manager: AsyncioManager) -> None:
        self._manager = manager

    def __repr__(self) -> str:
        return "<AsyncioRuntime>"

    def adopt_listener(self, sock: socket.socket) -> AsyncioListener:
        """The listening socket as an :class:`AsyncioListener` (takes ``sock``'s descriptor)."""
        return AsyncioListener(sock)

    def wake_listener(self, listener: Any) -> None:
        """Nothing to do: the manager cancels the acceptor when it stops it."""

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` on the manager's loop; True once it has, False after ``timeout``.

        The stop's batch of ``shutdown`` calls: one hop instead of a GIL hand-off per
        socket. In the loop's thread, or with no loop, ``fn()`` runs here.
        """
        return self._manager.run_in_loop(fn, timeout)

    def spawn_soon(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Start ``thunk()`` as a task of the loop, from any thread (``Server.submit``).

        Not one of the manager's tasks: no id, no limit. Calls from other threads are
        batched, one wake-up of the loop per batch (``weft_core.SpawnsSoon``).
        """
        self._manager.spawn_soon(thunk)

    def slots(self, n: int) -> AsyncioSlots:
        """``n`` connection slots."""
        return AsyncioSlots(n)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)

    def wrap_connection(
        self, sock: AsyncioSocket, idle_timeout: float | None = None
    ) -> AsyncioStream:
        """The :class:`AsyncioStream` a handler receives (its transport is made on first use)."""
        if type(sock) is _Accepted:
            sock.__class__ = AsyncioSocket  # type: ignore[assignment]  # recv as a socket's
        home = self._manager._home  # the loop this connection's task runs on
        return AsyncioStream(sock, idle_timeout, None if home is None else home.loop)

    def wrap_tls(self, stream: AsyncioStream, context: ssl.SSLContext) -> AsyncioStream:
        """The same stream, its transport to be made with TLS by ``do_handshake()``."""
        stream._tls = context
        return stream

    if sys.version_info >= (3, 11):

        async def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> T:
            """``await fn()``, raising ``TimeoutError`` after ``seconds``.

            Its message says how long (logged as "TLS handshake ... failed: timed out
            after 10s"): ``asyncio.timeout``'s own has none.
            """
            try:
                async with asyncio.timeout(seconds):
                    return await fn()
            except TimeoutError as exc:
                if isinstance(exc.__cause__, asyncio.CancelledError):  # the deadline's
                    raise TimeoutError(f"timed out after {seconds:g}s") from None
                raise

    else:  # pragma: no cover - Python 3.10

        async def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> T:
            """``await fn()``, raising ``TimeoutError`` after ``seconds``."""
            try:
                return await asyncio.wait_for(fn(), seconds)
            except asyncio.TimeoutError:
                raise TimeoutError(f"timed out after {seconds:g}s") from None

    async def aclose(self, conn: AsyncioStream) -> None:
        """Close the stream (see :meth:`AsyncioStream.aclose`), its byte counts read."""
        conn._released = True
        await conn.aclose()

    def close(self) -> None:
        """End the manager's own loop thread, or let go of the application's loop."""
        self._manager.close_loop()
