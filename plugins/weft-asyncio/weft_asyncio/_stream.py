"""AsyncioStream: what a handler receives, one object that is protocol, reader and writer.

``asyncio.start_server`` makes four objects per connection besides the transport (a
``StreamReaderProtocol``, a ``StreamReader``, its buffer and a ``StreamWriter``). An
:class:`AsyncioStream` is all of them at once: the transport's protocol, the
reading side of ``asyncio.StreamReader`` (``read``, ``readline``, ``readexactly``,
``readuntil``, ``at_eof``) and the writing side of
``asyncio.StreamWriter`` (``write``, ``writelines``, ``drain``, ``close``,
``wait_closed``, ``get_extra_info``), plus trio's ``SocketStream`` methods
(``receive_some``, ``send_all``, ``send_eof``, ``aclose``, ``socket``), so that a
handler written for either runs unchanged.

Receiving goes through ``asyncio.BufferedProtocol``: the transport reads into one
scratch buffer per loop thread, and the stream keeps only the bytes not yet read.
An idle connection holds an empty ``bytearray`` and no other buffer.

Until the stream needs to wait, it needs no transport. Its first read goes to the
socket itself (``recv`` without waiting), as trio's streams read, and so do writes
while no transport exists: a connection that brings its request at once, gets its
answer and closes never has one (no ``connect_accepted_socket``, no reader
registered with the loop, no callbacks). The first read that finds nothing, a
``drain`` with bytes the kernel did not take, or the TLS handshake makes it: on
asyncio's own loops at once, as ``loop.connect_accepted_socket`` makes it but
without its wait for the loop's next turn; on uvloop (or another loop) by
``connect_accepted_socket``, driven by the loop's callbacks rather than awaited by a
task (a read waits for its data only). Bytes the kernel did not take wait in the
stream and go out as soon as the transport exists, at the latest when the stream is
closed. Only the first read goes to the socket itself: a client that never stops
sending must not keep its handler from yielding to the loop.

What does not live here: the loop, the tasks and the sockets (``_runtime.py``,
``_manager.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import socket
import ssl
import struct
import sys
import termios
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ._tls_session import TLSSession

__all__ = ["AsyncioStream"]

#: asyncio's own loops, whose private ``_make_socket_transport`` the stream calls.
_SELECTOR_LOOP = asyncio.selector_events.BaseSelectorEventLoop

#: What one receive asks the kernel for, and what ``receive_some()`` returns at most
#: without an argument: ``asyncio.StreamReader``'s default limit.
CHUNK = 2**16
#: ``readline``/``readuntil`` give up (``LimitOverrunError``) on a line longer than
#: this, and reading pauses while this many bytes wait unread, twice over:
#: ``asyncio.StreamReader``'s defaults (``limit=2**16``, paused at ``2 * limit``).
LIMIT = 2**16
#: The most of one ``send_all`` handed to the transport before it drains: what a
#: peer that does not read can make the server hold per connection, beyond the
#: handler's own bytes and the transport's high-water mark.
SEND_CHUNK = 2**18
#: How long closing waits for the peer to take any of the unsent bytes (or TLS's
#: close_notify) before it aborts the connection: a peer that stopped reading must
#: not keep the descriptor open after its task ended, while one still reading gets
#: the whole reply, however long it takes.
CLOSE_WAIT = 2.0

#: ``recv``/``send`` flag: do not wait, whether or not the descriptor is non-blocking
#: yet (before uvloop's transport it may still block).
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)

#: See :meth:`AsyncioStream.connection_lost`.
_CACHED_READ_CALLBACK = sys.version_info < (3, 12)

_scratch = threading.local()


def _scratch_buffer() -> memoryview:
    """This thread's receive buffer: one per loop thread, shared by its connections."""
    try:
        view: memoryview = _scratch.view
    except AttributeError:
        view = _scratch.view = memoryview(bytearray(CHUNK))
    return view


def _expire(waiter: asyncio.Future[None], message: str) -> None:
    _wake(waiter, TimeoutError(message))


def _unsent(transport: asyncio.BaseTransport, sock: socket.socket) -> int:
    """Bytes not yet taken by the peer: the transport's buffer and the kernel's queue.

    The kernel's send queue holds megabytes on its own: a peer reading slowly empties
    it long before the transport's buffer moves. Where the queue cannot be read
    (not Linux, a closed socket), the transport's buffer alone.
    """
    queued = 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        queued = int.from_bytes(raw, sys.byteorder, signed=True)
    except (OSError, ValueError):
        pass
    return transport.get_write_buffer_size() + max(queued, 0)  # type: ignore[attr-defined,no-any-return]


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the close of a cut connection a reset (``SO_LINGER`` 0), not a FIN.

    Closed with a FIN, a cut reply reached the client as the bytes its kernel
    held and then an ordinary end: it could not tell the reply was cut. A reset
    says so, and the kernel drops what it still queued for a client that reads
    nothing.
    """
    sock = transport.get_extra_info("socket")  # uvloop's too (the stream's is detached)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _wake(waiter: asyncio.Future[None] | None, exc: BaseException | None = None) -> None:
    """Wake the tasks waiting on ``waiter`` (through shields), with ``exc`` if given.

    An exception is marked as read here: every waiter gets it through its shield,
    and one whose task was cancelled first (the stop's phase 3 interrupting a
    ``drain()``) leaves nobody to read it, which asyncio logged at ERROR, with a
    traceback, as "Future exception was never retrieved", once per connection.
    """
    if waiter is not None and not waiter.done():
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
            waiter.exception()


class AsyncioStream(asyncio.BufferedProtocol):
    """A connection as asyncio streams and trio's ``SocketStream`` present one.

    Reading: ``await read(n=-1)``, ``readline()``, ``readexactly(n)``,
    ``readuntil(separator)``, ``receive_some(max_bytes=None)`` (``b""`` at end of
    input), ``at_eof()``, ``async for chunk in stream`` (chunks, as on trio). Writing: ``write(data)``
    then ``await drain()`` (back-pressure), or ``await send_all(data)``;
    ``await send_eof()`` half-closes. ``close()`` / ``await aclose()``.
    ``socket`` is the connection's socket (for ``setsockopt``, ``getpeername``).

    Error handling: with ``idle_timeout``, a read that waits that long for data, or a
    ``drain`` that waits that long for the peer to read, raises ``TimeoutError``. A
    reset connection raises ``ConnectionResetError`` from the next read or ``drain``.
    """

    __slots__ = (
        "_buffer",
        "_close_when_made",
        "_closer",
        "_closing",
        "_connected",
        "_direct",
        "_drainer",
        "_eof",
        "_eof_written",
        "_error",
        "_idle",
        "_loop",
        "_lost",
        "_making",
        "_nodelay_off_when_made",
        "_paused",
        "_pending",
        "_reading_paused",
        "_released",
        "_scratch",
        "_session",
        "_shaker",
        "_sock",
        "_tls",
        "_tls_held",
        "_transport",
        "_waiter",
    )

    def __init__(
        self,
        sock: socket.socket,
        idle_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._sock = sock
        # The runtime passes its loop: asyncio.get_running_loop() costs a getpid()
        # system call per call on Python 3.11.
        self._loop = loop or asyncio.get_running_loop()
        self._scratch = _scratch_buffer()
        self._buffer = bytearray()
        self._transport: asyncio.BaseTransport | None = None
        self._idle = idle_timeout
        self._tls: ssl.SSLContext | None = None
        #: The TLS session, made with the transport when ``wrap_tls`` set ``_tls``.
        self._session: TLSSession | None = None
        #: The future ``do_handshake`` waits on while the handshake goes on.
        self._shaker: asyncio.Future[None] | None = None
        self._eof = False
        #: write_eof() was called: nothing may be written after it.
        self._eof_written = False
        #: close() or aclose() was called.
        self._closing = False
        self._lost = False
        self._error: BaseException | None = None
        self._paused = False
        self._reading_paused = False
        #: Reading paused while the transport's write buffer is full, under TLS: the
        #: session answers what the peer sends (a key update) by itself, and a peer
        #: that sends and never reads grew the buffer without bound.
        self._tls_held = False
        #: What was written while no transport existed and the kernel did not take:
        #: a bytearray, so that many small writes append in linear time.
        self._pending: bytearray | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._closer: asyncio.Future[None] | None = None
        #: Set by the server as it closes the stream, the handler done (its byte
        #: counts read): nothing more to keep for it then.
        self._released = False
        #: uvloop's ``connect_accepted_socket`` coroutine while it makes the transport
        #: (:meth:`_step_making`); what a task wanting the transport waits on meanwhile
        #: (made by the first: a read waits for the data instead); and whether the
        #: socket's TCP_NODELAY, off, is to be restored once it is made.
        self._making: Any = None
        self._connected: asyncio.Future[None] | None = None
        self._nodelay_off_when_made = False
        #: close() came while uvloop made the transport, whose descriptor is uvloop's
        #: by then: the transport is closed as it is made.
        self._close_when_made = False
        #: The first read may still go to the socket itself (:meth:`_read_directly`).
        self._direct = True

    @property
    def socket(self) -> socket.socket:
        """The connection's socket, non-blocking: for ``setsockopt``, ``getpeername`` ...

        The stream makes the descriptor non-blocking as its transport is made (uvloop
        does it itself, so at accept it would be a second system call); a handler
        that takes the socket before that gets it non-blocking all the same.
        """
        sock = self._sock
        if sock.gettimeout() != 0.0 and sock.fileno() >= 0:
            sock.setblocking(False)
        return sock

    def __repr__(self) -> str:
        try:
            peer = self._sock.getpeername()
        except OSError:
            peer = "closed"
        return f"<AsyncioStream {peer}>"

    # -- the transport -----------------------------------------------------------------

    async def _connect(self) -> asyncio.BaseTransport:
        """The transport: made at once on asyncio's loops; on uvloop, once uvloop has made it.

        TLS, if ``wrap_tls`` asked for it, runs above it. Cancelling this wait
        leaves the making to go on (see :meth:`_start_transport`).
        """
        transport = self._start_transport()
        if transport is not None:
            return transport
        if self._making is not None:
            # One future for every task waiting for it (a reader and a writer), each
            # through a shield: one of them cancelled cancels no other.
            waiter = self._connected
            if waiter is None:
                self._connected = waiter = self._loop.create_future()
            await asyncio.shield(waiter)
        made = self._transport
        if made is None:
            raise self._error or ConnectionResetError("Connection lost")
        return made

    def _start_transport(self) -> asyncio.BaseTransport | None:
        """Make the transport, or start its making; the transport, if it exists now.

        On asyncio's own loops it is made at once (:meth:`_make_transport_now`). On
        uvloop (or another loop) it is ``loop.connect_accepted_socket``'s to make,
        which makes it, then waits for the loop's call of ``connection_made``. That
        coroutine is driven by the loop's callbacks (:meth:`_step_making`), not
        awaited by the task that first needed the transport: a read cancelled
        meanwhile must not cancel the making, which uvloop answers by closing the
        new transport. A read waits for its data, which comes after
        ``connection_made``.
        """
        transport = self._transport
        if transport is not None or self._making is not None:
            return transport
        if self._sock.fileno() < 0:  # closed (close() before any I/O): as a lost connection
            self._eof = self._lost = True
            raise ConnectionResetError("Connection lost")
        transport = self._make_transport_now()
        if transport is None:
            # uvloop makes the descriptor non-blocking itself, and turns TCP_NODELAY on.
            self._nodelay_off_when_made = not self._prepare()
            self._making = self._loop.connect_accepted_socket(lambda: self, self._sock)
            self._step_making()
        return self._transport

    def _step_making(self, _done: object = None) -> None:
        """Run uvloop's making coroutine on, as a task would; again once the future it awaits is done.

        A method of the stream, its common path calling no other Python function: it
        runs twice for every connection on uvloop.
        """
        try:
            awaited = self._making.send(None)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # its end: StopIteration, or uvloop's failure
            # (a CancelledError too: left out, _making stayed set and the stream hung)
            self._making = None
            if not isinstance(exc, StopIteration) and not self._lost:
                # uvloop closed what it made: a lost connection, for every waiter.
                lost = ConnectionResetError(f"Connection lost: {exc!r}")
                lost.__cause__ = exc
                self.connection_lost(lost)
            elif self._transport is not None and self._nodelay_off_when_made:
                self._nodelay_off()
            waiter, self._connected = self._connected, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._close_when_made and self._transport is not None:
                self.close()
            return
        if getattr(awaited, "_asyncio_future_blocking", None) is not None:  # a future
            awaited._asyncio_future_blocking = False  # taken, as a task takes it
            awaited.add_done_callback(self._step_making)
        else:  # a bare yield: the loop's next turn
            self._loop.call_soon(self._step_making)

    def _prepare(self) -> int:
        """Before the transport is made: its TLS session; the socket's TCP_NODELAY then."""
        if self._tls is not None and self._session is None:
            self._session = TLSSession(self._tls)
        sock = self._sock
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return 1
        known: bool | None = getattr(sock, "nodelay", None)  # an AsyncioSocket keeps it
        if known is not None:
            return known
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    def _nodelay_off(self) -> None:
        """The transport turned TCP_NODELAY on: off again, as the socket had it."""
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def _make_transport_now(self) -> asyncio.BaseTransport | None:
        """On asyncio's own loops, the transport, made at once; None on other loops.

        What ``connect_accepted_socket`` would make, without its wait for
        ``connection_made``. That wait costs the task a trip through the loop per
        connection (two coroutines, a future, a wake-up). The transport works from
        the start; what was written before it existed goes out now, ahead of anything
        written next, and the loop's own call of ``connection_made``, a turn later,
        finds nothing left to do (reading starts with that turn, as it would have).
        """
        # Only asyncio's own selector loops: another loop may have a private method
        # of that name that takes other arguments.
        if not isinstance(self._loop, _SELECTOR_LOOP):
            return None
        make = self._loop._make_socket_transport  # type: ignore[attr-defined]
        nodelay = self._prepare()
        self._sock.setblocking(False)  # as connect_accepted_socket does; uvloop does its own
        transport: asyncio.BaseTransport = make(self._sock, self)
        self.connection_made(transport)
        if not nodelay:
            self._nodelay_off()
        return transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The transport exists: send what was written before it did (a second call: nothing)."""
        self._transport = transport
        pending, self._pending = self._pending, None
        if pending:
            transport.write(pending)  # type: ignore[attr-defined]
        if self._session is not None:
            self._send_tls()  # what was encrypted before the transport existed

    def get_buffer(self, sizehint: int) -> memoryview:
        """The loop thread's scratch buffer; ``buffer_updated`` copies out what arrived."""
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        """Keep what arrived and wake the reader; pause reading past ``2 * LIMIT`` unread."""
        buffer = self._buffer
        if self._session is None:
            buffer += self._scratch[:nbytes]
        else:
            self._session.feed(self._scratch[:nbytes])
            self._tls_step()
            if not buffer and not self._eof:
                return  # records with no data in them yet (the handshake, a key update)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(buffer) > 2 * LIMIT and not self._reading_paused:
            self._reading_paused = True
            if not self._tls_held:
                self._transport.pause_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        """What arrived, from a loop that does not use buffered protocols.

        asyncio's loops and uvloop call :meth:`get_buffer` and :meth:`buffer_updated`
        instead. uvloop looks this method up on every connection all the same, and
        without it that costs a raised and caught ``AttributeError``.
        """
        view = memoryview(data)
        scratch = self._scratch
        while view:
            n = min(len(view), len(scratch))
            scratch[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def eof_received(self) -> bool:
        """End of input (the peer's FIN, or the server's ``shutdown(SHUT_RD)`` at a stop).

        Returns True: the connection stays open for writing, so a handler can still
        answer after its input ended. Under TLS too: the FIN alone ends the
        stream's input, as on the other managers, and is not fed to the session:
        OpenSSL 3 takes an end without close_notify as a fatal error, after which
        the session would refuse to encrypt the rest of the reply.
        """
        self._eof = True
        _wake(self._waiter)
        _wake(self._shaker, ConnectionResetError("the peer closed during the TLS handshake"))
        return True

    # -- TLS, run by the stream over the plain transport (see _tls_session) ---------------

    def _tls_step(self) -> None:
        """Advance the session with what was fed; keep the plaintext, send its output."""
        session = self._session
        assert session is not None
        handshaken = session.handshaken
        try:
            if session.step(self._buffer):
                self._eof = True
        except ssl.SSLError as exc:
            self._error = exc
            self._eof = True
            _wake(self._shaker, exc)
        self._send_tls()
        if session.handshaken and not handshaken:
            _wake(self._shaker)

    def _send_tls(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            data = self._session.outgoing()  # type: ignore[union-attr]
            if data:
                transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport closed: wake every waiter; a reset is raised by the next read."""
        if _CACHED_READ_CALLBACK:
            # The selector transport keeps a bound method of itself, a reference cycle
            # per connection that only the garbage collector frees (CPython issue
            # gh-100348, fixed in 3.12). It reads no more: dropping it lets reference
            # counting free the transport and its socket the moment they end.
            attributes = getattr(self._transport, "__dict__", None)  # uvloop's have none
            if attributes is not None:
                attributes.pop("_read_ready_cb", None)
        self._eof = True
        self._lost = True
        if exc is not None:
            self._error = exc
        # The transport closes the descriptor next, maybe before the server's
        # accounting of the connection reads its byte counts (a reset; a handler that
        # closed the stream and waits on): keep them.
        self._keep_counts()
        # Every waiter woken; most are None (a reader waits, seldom more), so each
        # is tested here rather than in a call.
        if self._waiter is not None:
            _wake(self._waiter)
        if self._shaker is not None:
            _wake(self._shaker, exc or ConnectionResetError("Connection lost"))
        if self._drainer is not None:
            _wake(self._drainer, exc or ConnectionResetError("Connection lost"))
        if self._closer is not None:
            _wake(self._closer)

    def pause_writing(self) -> None:
        """The transport's buffer is full: ``drain()`` waits; under TLS, reading pauses.

        A TLS session writes by itself what the peer asks (a key update answered,
        an alert): from a peer that sends and never reads, that grew the write
        buffer, and the server's memory, byte for byte with what it sent. Paused
        reading stalls the peer's sending instead, as a blocking send does on the
        other managers, and ``idle_timeout`` then ends a reader that waits.
        """
        self._paused = True
        if self._session is not None and not self._tls_held:
            self._tls_held = True
            if not self._reading_paused:
                self._transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        """The transport's buffer drained: wake ``drain()``; under TLS, read again."""
        self._paused = False
        if self._tls_held:
            self._tls_held = False
            if not self._reading_paused:
                self._transport.resume_reading()  # type: ignore[union-attr]
        _wake(self._drainer)

    # -- reading -------------------------------------------------------------------------

    async def _wait_for_data(self, what: str) -> None:
        """Wait until something was received or the input ended; ``idle_timeout`` bounds it."""
        if self._waiter is not None:
            raise RuntimeError(
                f"{what}() called while another coroutine is already waiting for incoming data"
            )
        if self._transport is None:
            if self._direct and self._read_directly():
                return
            self._start_transport()  # on uvloop, made by the time data comes
            if self._eof:  # its making failed at once: nothing will come
                return
        if self._reading_paused:
            self._reading_paused = False
            if not self._tls_held:
                self._transport.resume_reading()  # type: ignore[union-attr]
        loop = self._loop
        self._waiter = waiter = loop.create_future()
        timer = None
        if self._idle is not None:
            timer = loop.call_later(
                self._idle,
                _expire,
                waiter,
                f"no data from the peer for {self._idle:g}s (idle_timeout)",
            )
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _read_directly(self) -> bool:
        """The first read, from the socket itself: True if it took data or the end.

        A connection that gets its request at once, answers it and closes (a
        connection per request) then never needs a transport at all: no
        ``connect_accepted_socket``, no reader registered with the loop, no
        callbacks. Once only: a client that never stops sending must not keep the
        handler from yielding to the loop, which a transport's reads make it do.
        """
        self._direct = False
        if self._making is not None or self._tls is not None or self._pending:
            return False
        sock = self._sock
        if sock.fileno() < 0:
            return False
        scratch = self._scratch  # the loop thread's, as the transport reads into it
        try:
            received = sock.recv_into(scratch, CHUNK, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False  # nothing yet: the transport waits for it
        except OSError as exc:  # reset already: as the transport's read would say
            self._lost_directly(exc)
            return True
        if received:
            # Into the scratch buffer, not a new 64 KiB bytes object per connection:
            # those, shrunk to what came, left the heap in pieces (idle memory
            # per connection on uvloop went from 0.97x raw's to 1.00x).
            self._buffer += scratch[:received]
        else:
            self._eof = True
        return True

    def _failure(self) -> BaseException | None:
        """What broke the connection, if anything did (a reset)."""
        return self._error

    def _lost_error(self) -> BaseException:
        """What ``drain()`` raises for a lost connection: ``ConnectionResetError``.

        As ``StreamWriter.drain`` does, whatever the system call said (a write to a
        peer that closed fails with ``BrokenPipeError``): ``except
        ConnectionResetError`` around a drain is the usual idiom. The cause is chained.
        """
        failure = self._failure()
        if isinstance(failure, ConnectionResetError):
            return failure
        lost = ConnectionResetError("Connection lost")
        lost.__cause__ = failure
        return lost

    def _take(self, n: int) -> bytes:
        buffer = self._buffer
        if len(buffer) <= n:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(memoryview(buffer)[:n])
            del buffer[:n]
        if self._reading_paused and len(buffer) <= LIMIT:
            self._reading_paused = False
            if not self._tls_held:
                self._transport.resume_reading()  # type: ignore[union-attr]
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``b""`` at end of input); with ``n < 0``, all until end of input."""
        if self._error is not None:
            raise self._error
        if n == 0:
            return b""
        if n < 0:
            chunks = []
            while chunk := await self.read(LIMIT):
                chunks.append(chunk)
            return b"".join(chunks)
        if not self._buffer and not self._eof:
            await self._wait_for_data("read")
            error: BaseException | None = self._error  # a reset while waiting
            if error is not None and not self._buffer:
                raise error
        return self._take(n)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """trio's: up to ``max_bytes`` (default 64 KiB), ``b""`` at end of input."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return await self.read(max_bytes or CHUNK)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` if the input ends first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        if self._error is not None:
            raise self._error
        while len(self._buffer) < n:
            if self._eof:
                if self._error is not None:  # reset mid-message: not an end of input
                    raise self._error
                partial = self._take(len(self._buffer))
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait_for_data("readexactly")
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including ``separator``, as ``StreamReader.readuntil``.

        ``asyncio.IncompleteReadError`` if the input ends first (with what was read),
        ``asyncio.LimitOverrunError`` past ``LIMIT`` bytes (the bytes stay unread).
        """
        seplen = len(separator)
        if seplen == 0:
            raise ValueError("Separator should be at least one-byte string")
        if self._error is not None:
            raise self._error
        offset = 0
        while True:
            buffer = self._buffer
            found = buffer.find(separator, offset)
            if found >= 0:
                break
            offset = max(0, len(buffer) + 1 - seplen)
            if offset > LIMIT:
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", offset
                )
            if self._eof:
                if self._error is not None:  # reset mid-message: not an end of input
                    raise self._error
                raise asyncio.IncompleteReadError(self._take(len(buffer)), None)
            await self._wait_for_data("readuntil")
        if found > LIMIT:
            raise asyncio.LimitOverrunError(
                "Separator is found, but chunk is longer than limit", found
            )
        return self._take(found + seplen)

    async def readline(self) -> bytes:
        """One line, with its newline (the rest at end of input; ``b""`` after it)."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            buffer = self._buffer
            if buffer.startswith(b"\n", exc.consumed):
                del buffer[: exc.consumed + 1]
            else:
                buffer.clear()
            raise ValueError(exc.args[0]) from None

    def at_eof(self) -> bool:
        """True once the input ended and every byte of it was read."""
        return self._eof and not self._buffer

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        """``async for chunk in stream``: chunks as they arrive, as trio's streams give them.

        Not lines, as ``StreamReader``'s iteration gives: weft's async handlers are
        written against trio's stream methods, iteration included; ``readline()``
        reads lines.
        """
        chunk = await self.read(CHUNK)
        if not chunk:
            raise StopAsyncIteration
        return chunk

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending (``await drain()`` for back-pressure).

        Once the connection is lost (or closed), what is written is dropped, as
        asyncio's transport drops it: ``drain()`` says whether it was lost.
        """
        transport = self._transport
        if self._eof_written:  # said here: uvloop's transport dropped it unsaid
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._session is not None:
            self._session.write(data)
            self._send_tls()
        elif transport is not None:
            try:
                transport.write(data)  # type: ignore[attr-defined]
            except RuntimeError:
                # uvloop refuses a write to a closed transport (a reset it saw, a
                # close()) where asyncio's drops it: dropped here on both.
                if not transport.is_closing():
                    raise
        elif self._pending is None and self._making is None and self._tls is None:
            self._write_directly(data)
        elif self._pending is None:
            self._pending = bytearray(data)
        else:
            self._pending += data

    def _write_directly(self, data: bytes | bytearray | memoryview) -> None:
        """No transport yet: to the socket itself, what the kernel takes at once.

        The rest waits in the stream, for the transport that ``drain`` (or closing)
        makes to send it. A failure (the peer reset) is raised by the next read or
        ``drain``, as the transport would raise it.
        """
        if self._error is not None:
            return
        if self._sock.fileno() < 0:  # closed: as a write to a lost transport
            if not self._closing:  # by the handler's close(): dropped, as asyncio drops it
                self._lost_directly(ConnectionResetError("Connection lost"))
            return
        try:
            sent = self._sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost_directly(exc)
            return
        if sent < len(data):
            # The kernel's buffer is full: the rest waits for a transport, made (or
            # its making started) now, so that it goes out as the peer reads, as it
            # would from a transport, without waiting for drain() or the handler's end.
            self._pending = bytearray(memoryview(data)[sent:])
            self._start_transport()

    def _lost_directly(self, exc: BaseException) -> None:
        """A read or write to the socket itself failed: lost, as ``connection_lost`` says.

        The next read or ``drain`` raises ``exc``.
        """
        self._error = exc
        self._eof = self._lost = True

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue every item of ``data`` for sending."""
        for item in data:
            self.write(item)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark.

        ``ConnectionResetError`` if the connection was lost, or closed (as
        ``StreamWriter.drain``'s); ``TimeoutError`` if the peer read nothing for
        ``idle_timeout`` seconds.
        """
        transport = self._transport
        if transport is None:
            if self._lost:  # a write or read straight to the socket failed
                raise self._lost_error()
            if self._closing and self._sock.fileno() < 0:  # closed by the handler
                raise ConnectionResetError("Connection lost")
            if not self._pending and self._making is None:
                return  # everything written went to the socket itself
            transport = await self._connect()
        if transport.is_closing() and not self._lost:
            # A write failed (the peer reset): the transport tells the protocol at
            # the loop's next turn. Yield to it, as StreamWriter.drain does, so that
            # this drain raises rather than the handler writing on into the void.
            await asyncio.sleep(0)
        if self._lost:
            raise self._lost_error()
        if not self._paused:
            return
        loop = self._loop
        # One future for every task draining at once (StreamWriter wakes them all),
        # each waiting through a shield: one of them cancelled cancels no other.
        drainer = self._drainer
        if drainer is None or drainer.done():
            self._drainer = drainer = loop.create_future()
        timer = None
        if self._idle is not None:
            timer = loop.call_later(
                self._idle,
                _expire,
                drainer,
                f"the peer stopped reading: nothing could be sent for {self._idle:g}s"
                " (idle_timeout)",
            )
        try:
            await asyncio.shield(drainer)
        finally:
            if self._drainer is drainer and drainer.done():
                self._drainer = None
            if timer is not None:
                timer.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """trio's: send all of ``data``, waiting while the peer is slow to read.

        A large ``data`` goes to the transport :data:`SEND_CHUNK` bytes at a time,
        each drained before the next: written whole, the transport (and, under TLS,
        the session's encrypted copy) held all of it for a peer that does not read,
        twice the write per stalled client (the peer check's MED-2), where threads
        and gevent hold nothing beyond the handler's own bytes.
        """
        if self._closing:
            # trio's send_all raises ClosedResourceError here, the handler's own error
            # (as a closed socket's EBADF is on threads), not the peer's: drain()
            # would say ConnectionResetError, as StreamWriter's does.
            raise OSError(errno.EBADF, "send_all() on a stream already closed (close or aclose)")
        if len(data) <= SEND_CHUNK:
            self.write(data)
            await self.drain()
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), SEND_CHUNK):
            self.write(view[start : start + SEND_CHUNK])
            await self.drain()

    def can_write_eof(self) -> bool:
        """True unless the connection is TLS (TLS has no half-close)."""
        return self._tls is None

    def write_eof(self) -> None:
        """Half-close after the queued bytes (StreamWriter's; needs the transport)."""
        if self._tls is not None:
            raise NotImplementedError("TLS has no half-close: close the stream instead")
        if self._transport is None and self._lost:
            return  # a direct read or write found it reset: the next read or drain says so
        transport = self._transport or self._make_transport_now()
        if transport is None:  # uvloop: its transport is made only by an await
            self._shut_writing_now()
            return
        try:
            transport.write_eof()  # type: ignore[attr-defined]
        except OSError:
            # shutdown() on a connection the peer reset before the transport (just
            # made) read it: quiet, as a transport that saw the reset is; the next
            # read or drain raises ConnectionResetError.
            pass
        self._eof_written = True

    def _shut_writing_now(self) -> None:
        """``write_eof()`` before uvloop's transport exists: what waits, then the FIN.

        The bytes written so far go to the kernel at once, which takes a reply of any
        usual size whole; one larger than its buffer leaves the rest waiting, and
        ``write_eof()`` then says to ``await send_eof()`` instead.
        """
        pending = self._pending
        if pending:
            try:
                sent = self._sock.send(pending, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the peer is gone: the next read or drain says so
                sent = len(pending)
            self._pending = pending[sent:] or None
            if self._pending is not None:
                raise RuntimeError(
                    "write_eof() before any I/O on uvloop, after writing more than the"
                    " kernel takes at once; use 'await send_eof()' (or await drain() first)"
                )
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._eof_written = True

    async def send_eof(self) -> None:
        """trio's: half-close the connection once the queued bytes are sent (not under TLS)."""
        if self._tls is not None:
            raise NotImplementedError("TLS has no half-close: close the stream instead")
        transport = await self._connect()
        transport.write_eof()  # type: ignore[attr-defined]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As ``StreamWriter.get_extra_info`` (``"peername"``, ``"ssl_object"`` ...)."""
        session = self._session
        if session is not None and name in _TLS_INFO:
            return _TLS_INFO[name](self, session.obj)
        if self._transport is None:
            if name == "socket":
                return self.socket
            if name == "peername":
                try:
                    return self._sock.getpeername()
                except OSError:  # the client reset: the address it came from
                    return getattr(self._sock, "peer", default)
            if name == "sockname":
                return self._sock.getsockname()
            return default
        value = self._transport.get_extra_info(name, default)
        if name == "peername" and value is None:  # the transport came after a reset
            return getattr(self._sock, "peer", default)
        return value

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        """As trio's ``SocketStream``: set an option on the connection's socket."""
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        """As trio's ``SocketStream``."""
        if buffersize:
            return self._sock.getsockopt(level, option, buffersize)
        return self._sock.getsockopt(level, option)

    # -- TLS details (the server reads them once the handshake is done) --------------------

    async def do_handshake(self) -> None:
        """The TLS handshake (``wrap_tls`` set the context): return once it is done.

        Raises ``ssl.SSLError`` if it fails, ``ConnectionResetError`` if the peer
        leaves during it; the server bounds it with ``tls_handshake_timeout``.
        """
        await self._connect()
        session = self._session
        if session is None or session.handshaken:
            return
        if self._error is not None:
            raise self._error
        if self._eof:
            raise ConnectionResetError("the peer closed during the TLS handshake")
        self._shaker = shaker = self._loop.create_future()
        try:
            await shaker
        finally:
            self._shaker = None

    def _ssl_object(self) -> ssl.SSLObject | None:
        return None if self._session is None else self._session.obj

    def version(self) -> str | None:
        """The TLS version negotiated, or None."""
        obj = self._ssl_object()
        return None if obj is None else obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The TLS cipher negotiated, or None."""
        obj = self._ssl_object()
        return None if obj is None else obj.cipher()

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The client's certificate, if it sent one."""
        obj = self._ssl_object()
        return None if obj is None else obj.getpeercert(binary_form)

    # -- closing -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once ``close()`` was called or the connection was lost.

        Lost as a write or read straight to the socket found it (before any
        transport), too: a broadcast that drops its dead clients by this ran on.
        """
        if self._closing or self._lost:
            return True
        transport = self._transport
        if transport is None:
            return self._sock.fileno() < 0
        if self._eof_written:  # uvloop's transport says closing once half-closed
            return False
        return transport.is_closing()

    def close(self) -> None:
        """Close after the queued bytes are sent (StreamWriter's; ``aclose`` waits).

        Bytes written before the transport existed make it now, to send them as the
        peer reads them; the connection closes after them.
        """
        self._closing = self._eof = True  # a read after it: b"", as StreamReader's
        transport = self._transport
        if transport is None and self._pending and self._making is None and not self._lost:
            with contextlib.suppress(ConnectionResetError):  # closed already: nothing to send
                transport = self._start_transport()
        if transport is not None:
            if self._session is not None:
                self._goodbye()
            transport.close()
        elif self._making is not None:
            self._close_when_made = True
        else:
            self._keep_counts()
            self._sock.close()

    def _keep_counts(self) -> None:
        """Keep the kernel's byte counts for the server to read once the socket is closed.

        Nothing to keep once the server has released the stream: it read them first.
        """
        if self._released:
            return
        keep = getattr(self._sock, "keep_last_info", None)
        if keep is not None:
            keep()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (see :meth:`aclose`)."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close once the queued bytes (and TLS's goodbye) are out, as long as the peer reads.

        A peer whose kernel takes none of them for ``CLOSE_WAIT`` seconds is cut: the
        connection is reset (the client can tell the reply was cut), the rest dropped.
        With nothing left to send, the transport closes the descriptor in the loop's
        next iteration and this returns at once: a stop of ten thousand connections
        does not wait an iteration for each. Cancelled while waiting, it aborts.
        """
        self._closing = self._eof = True
        transport = self._transport
        if transport is None:
            if self._making is None and (not self._pending or self._sock.fileno() < 0):
                self._keep_counts()
                self._sock.close()
                return
            try:  # bytes written before any await, or uvloop making it: then close
                transport = await self._connect()
            except BaseException:
                if self._transport is None and self._making is None:
                    self._sock.close()  # never made (uvloop detaches it from a failed one)
                else:
                    self.close()  # cancelled meanwhile: as it is made, or now
                raise
        if self._session is not None:
            self._goodbye()
        transport.close()
        if self._lost:
            return
        if not transport.get_write_buffer_size():  # type: ignore[attr-defined]
            return
        loop = self._loop
        self._closer = closer = loop.create_future()
        unsent = _unsent(transport, self._sock)
        try:
            while True:
                timer = loop.call_later(CLOSE_WAIT, _wake, closer)
                try:
                    await asyncio.shield(closer)
                finally:
                    timer.cancel()
                left = _unsent(transport, self._sock)
                if self._lost or left >= unsent:
                    break  # closed; or nothing taken for CLOSE_WAIT: the peer stopped reading
                unsent = left
                self._closer = closer = loop.create_future()
        finally:
            self._closer = None
            if not self._lost:
                _reset_on_close(transport)
                transport.abort()  # type: ignore[attr-defined]

    def _goodbye(self) -> None:
        """TLS's close_notify, sent before the transport closes (never awaits the peer's)."""
        session = self._session
        if session is not None and not self._lost:
            session.goodbye()
            self._send_tls()


#: ``get_extra_info`` names a TLS stream answers itself, as asyncio's SSL transport does.
_TLS_INFO: dict[str, Any] = {
    "ssl_object": lambda stream, obj: obj,
    "sslcontext": lambda stream, obj: stream._tls,
    "peercert": lambda stream, obj: obj.getpeercert(),
    "cipher": lambda stream, obj: obj.cipher(),
    "compression": lambda stream, obj: obj.compression(),
}
