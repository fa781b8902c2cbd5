"""TrioRuntime: the trio-native operations weft's server needs (``AsyncRuntime``).

The server's one accept loop and one connection wrapper, written once in
``weft_core``, run inside :class:`~weft_trio.TrioManager`'s trio thread through
this object: it adopts the listening socket (:class:`TrioListener`, a trio socket
that accepts waiting clients in bursts), counts connection slots on a
``trio.Semaphore``, and wraps each accepted socket in a ``trio.SocketStream``, which
is what a handler receives.

What does not live here: the trio thread itself and the tasks (``_manager.py``).
Every coroutine and every slot method below must run in that thread; only
:meth:`TrioRuntime.close` may be called from anywhere.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import trio

__all__ = ["IdleTimeoutStream", "TrioListener", "TrioRuntime", "TrioSlots"]

T = TypeVar("T")

#: How many waiting clients the acceptor takes in a row before it passes through
#: trio's scheduler: ``asyncio.start_server``'s own batch (weft-asyncio's too).
ACCEPT_BURST = 100


class TrioListener:
    """The listening socket: a trio socket whose ``accept`` takes waiting clients in bursts.

    trio's own ``accept`` passes through the scheduler after every connection, so a
    listener whose clients arrive together (a thousand keep-alive clients opening
    at once) gets one of them per turn of the loop, a turn that grows with every
    client already served: the last of a thousand waited seconds in the kernel's
    queue before its first request was read. This one takes up to
    ``ACCEPT_BURST`` waiting clients in a row, and waits for the socket to become
    readable (a checkpoint) when none is waiting. It is a checkpoint for
    cancellation on every call, as trio's is.

    Everything else (``getsockname``, ``getsockopt``, ``family``, ``close`` ...) is
    the trio socket's, :attr:`socket`.
    """

    __slots__ = ("_burst", "_kind", "_raw", "socket")

    def __init__(self, sock: socket.socket) -> None:
        self._raw = sock
        #: The trio socket; owns ``sock``, and closing it wakes a waiting accept.
        self.socket = trio.socket.from_stdlib_socket(sock)
        #: What each accepted socket is made with, read once.
        self._kind = (sock.family, sock.type, sock.proto)
        self._burst = 0

    def __repr__(self) -> str:
        return f"<TrioListener {self.socket!r}>"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.socket, name)

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        """Wait for a client; its trio socket and address. Raises OSError as ``accept(2)`` does."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._burst >= ACCEPT_BURST:
            self._burst = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        raw = self._raw
        while True:
            try:
                fd, address = raw._accept()  # type: ignore[attr-defined]
                break
            except BlockingIOError:
                self._burst = 0
                await trio.lowlevel.wait_readable(raw)
        self._burst += 1
        accepted = socket.socket(*self._kind, fileno=fd)
        return trio.socket.from_stdlib_socket(accepted), address

    def fileno(self) -> int:
        """The listening descriptor."""
        return self.socket.fileno()

    def close(self) -> None:
        """Close the socket (idempotent); a waiting ``accept`` raises.

        From another thread (a stop whose trio loop a task blocks), where trio cannot
        tell its waiters, nothing is done: the acceptor closes the socket on its way
        out, as the loop runs again. Not ``shutdown()``, which would end the listening
        of every process sharing the socket (``--workers``), nor a bare close, whose
        descriptor number trio would still watch.
        """
        with contextlib.suppress(RuntimeError):  # "must be called from async context"
            self.socket.close()


class IdleTimeoutStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose ``receive_some`` gives up after ``idle_timeout`` seconds.

    trio's SocketStream cannot be subclassed, so this wraps one and offers the same
    interface (``socket``, ``setsockopt``, ``getsockopt``, ``send_eof`` ...). The
    handler sees ``TimeoutError`` (as a socket with a timeout raises on threads and
    gevent) and may catch it; otherwise the connection is closed.
    """

    def __init__(self, socket: trio.socket.SocketType, idle_timeout: float) -> None:
        self.stream = trio.SocketStream(socket)
        self.socket = socket
        self.idle_timeout = idle_timeout

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive as SocketStream does, within ``idle_timeout``."""
        with trio.move_on_after(self.idle_timeout):
            return await self.stream.receive_some(max_bytes)
        raise TimeoutError(f"no data from the peer for {self.idle_timeout}s (idle_timeout)")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send as SocketStream does, within ``idle_timeout`` (a peer that stops reading).

        Writes are bounded as reads are: a client that stops reading would otherwise
        hold its task, its slot and its buffers for ever.
        """
        with trio.move_on_after(self.idle_timeout):
            await self.stream.send_all(data)
            return
        raise TimeoutError(
            f"the peer stopped reading: nothing could be sent for {self.idle_timeout}s"
            " (idle_timeout)"
        )

    async def wait_send_all_might_not_block(self) -> None:
        """As SocketStream."""
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """As SocketStream."""
        await self.stream.send_eof()

    async def aclose(self) -> None:
        """As SocketStream."""
        await self.stream.aclose()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        """As SocketStream."""
        self.stream.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        """As SocketStream."""
        return self.stream.getsockopt(level, option, buffersize)


class TrioSlots:
    """Connection slots on a ``trio.Semaphore``: taken in the trio thread, freed from any.

    The runtime contract lets ``release()`` come from the stopping thread (a
    connection whose task never started). A ``trio.Semaphore`` may be touched only
    in its run: released from another thread, it took a parked waiter out of its lot
    and failed to reschedule it, and that waiter's deadline then crashed trio
    (``TrioInternalError``) under every connection. So a release from elsewhere is
    handed to the run that took a slot.
    """

    __slots__ = ("_semaphore", "_token")

    def __init__(self, n: int) -> None:
        self._semaphore = trio.Semaphore(n)
        #: The trio run that takes these slots, known from the first take in it.
        self._token: trio.lowlevel.TrioToken | None = None

    def __repr__(self) -> str:
        return f"<TrioSlots free={self._semaphore.value}>"

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free; True if taken. Not a checkpoint."""
        if self._token is None:
            with contextlib.suppress(RuntimeError):  # outside any run: not known yet
                self._token = trio.lowlevel.current_trio_token()
        try:
            self._semaphore.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    async def acquire_within(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for a slot; True if taken."""
        # A free slot is taken even with timeout=0: trio's acquire() checks for
        # cancellation before it looks at the count, so move_on_after(0) alone
        # would refuse a client while slots are free.
        if self.acquire_nowait():
            return True
        if timeout is None:
            await self._semaphore.acquire()
            return True
        if math.isnan(timeout) or timeout <= 0:
            return False
        with trio.move_on_after(timeout):
            await self._semaphore.acquire()
            return True
        return False

    def release(self) -> None:
        """Free one slot, waking the longest waiter; from any thread."""
        token = self._token
        if token is None or _in_run(token):
            self._semaphore.release()
            return
        with contextlib.suppress(trio.RunFinishedError):  # ended: nobody waits any more
            token.run_sync_soon(self._semaphore.release)


def _in_run(token: trio.lowlevel.TrioToken) -> bool:
    """True if the caller runs inside the trio run ``token`` belongs to."""
    try:
        return trio.lowlevel.current_trio_token() is token
    except RuntimeError:  # not in any trio run: another thread
        return False


#: How long a TLS stream whose handshake failed may take to send the alert OpenSSL queued.
ALERT_GRACE = 1.0


class _KeepsOutgoing:
    """The server's ``SSLContext`` as one ``trio.SSLStream`` uses it, keeping its outgoing BIO.

    trio's ``SSLStream``, once a handshake fails, is broken and closes without
    sending what OpenSSL queued in that BIO: the alert that tells the client why
    (``certificate_required`` for a client without the certificate
    ``require_client_cert`` asks for). The stream calls only ``wrap_bio`` on its
    context; this passes it on and keeps the BIO, so that :meth:`TrioRuntime.aclose`
    can send what is left.
    """

    __slots__ = ("context", "outgoing")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.outgoing: ssl.MemoryBIO | None = None

    def wrap_bio(
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, **kw: Any
    ) -> ssl.SSLObject:
        self.outgoing = outgoing
        return self.context.wrap_bio(incoming, outgoing, **kw)


class TrioRuntime:
    """trio sockets, ``trio.SocketStream`` connections, ``trio.Semaphore`` slots.

    Resource handling: :meth:`close` ends the manager's trio thread (cancelling any
    task still in it) and joins it, so no thread or fd of the runtime is left; the
    next ``add_task`` starts a new one.
    """

    # Typed as the protocol's whole HandlerKind: a protocol attribute is invariant.
    kind: Literal["sync", "async"] = "async"
    #: A handler gets a ``trio.SocketStream``, already a stream: ``Server(stream=True)``
    #: is refused.
    conn_is_stream = True
    #: A cancelled scope's: the task's own (stop_task) or the manager's nursery.
    cancellations: tuple[type[BaseException], ...] | None = (trio.Cancelled,)

    def __init__(
        self,
        close: Callable[[], None],
        run_in_loop: Callable[[Callable[[], object], float | None], bool],
        spawn_soon: Callable[[Callable[[], Awaitable[object]]], None],
    ) -> None:
        self._close = close
        self._run_in_loop = run_in_loop
        self._spawn_soon = spawn_soon
        #: Each TLS stream's outgoing BIO, for its alert after a failed handshake.
        self._outgoing: weakref.WeakKeyDictionary[trio.SSLStream[Any], ssl.MemoryBIO] = (
            weakref.WeakKeyDictionary()
        )

    def spawn_soon(self, thunk: Callable[[], Awaitable[object]]) -> None:
        """Start ``thunk`` as a task of the manager's nursery; from any thread, batched.

        ``Server.submit`` uses it: from another thread, one wake-up of the trio loop
        starts every thunk queued meanwhile.
        """
        self._spawn_soon(thunk)

    def run_in_loop(self, fn: Callable[[], object], timeout: float | None = None) -> bool:
        """Run ``fn()`` in the manager's trio thread; True once it has, False after ``timeout``.

        The stop's batch of ``shutdown`` calls: one hop instead of a GIL hand-off per
        socket. With no trio thread running, ``fn()`` runs here.
        """
        return self._run_in_loop(fn, timeout)

    def __repr__(self) -> str:
        return "<TrioRuntime>"

    def adopt_listener(self, sock: socket.socket) -> TrioListener:
        """The listening socket as a :class:`TrioListener`; ``await accept()`` on it.

        Takes ownership of ``sock``: closing the returned object closes it.
        """
        return TrioListener(sock)

    def wake_listener(self, listener: Any) -> None:
        """Nothing to do: the manager interrupts the acceptor (cancels its scope) when it stops."""

    def slots(self, n: int) -> TrioSlots:
        """A ``trio.Semaphore`` of ``n`` slots."""
        return TrioSlots(n)

    async def sleep(self, seconds: float) -> None:
        """``trio.sleep``."""
        await trio.sleep(seconds)

    def wrap_connection(
        self, sock: trio.socket.SocketType, idle_timeout: float | None = None
    ) -> trio.SocketStream | IdleTimeoutStream:
        """``trio.SocketStream(sock)``, what the handler receives.

        With ``idle_timeout``, a :class:`IdleTimeoutStream`
        (a SocketStream look-alike) whose ``receive_some`` raises ``TimeoutError``
        after that long without data.
        trio turns ``TCP_NODELAY`` on for every TCP ``SocketStream``.
        """
        if idle_timeout is None:
            return trio.SocketStream(sock)
        return IdleTimeoutStream(sock, idle_timeout)

    def wrap_tls(self, stream: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream[Any]:
        """A server-side ``trio.SSLStream`` over ``stream``; the caller does the handshake.

        A client that closes its TCP connection without TLS's close_notify (most do)
        is an end of input, not a TLS error. weft's own contexts say so to OpenSSL
        (``OP_IGNORE_UNEXPECTED_EOF``): the stream is then spec-compliant, and closing
        sends close_notify (never waiting for the peer's). A context of the
        application's without that option gets ``https_compatible``, which takes such
        an end as the end of input too, and closes without close_notify.
        """
        ignores_eof = bool(context.options & getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0))
        keeper = _KeepsOutgoing(context)
        tls = trio.SSLStream(
            stream,
            keeper,  # type: ignore[arg-type]  # the stream calls only wrap_bio (see the class)
            server_side=True,
            https_compatible=not ignores_eof,
        )
        if keeper.outgoing is not None:
            self._outgoing[tls] = keeper.outgoing
        return tls

    #: What a failed TLS handshake raises besides OSError (trio wraps ssl errors).
    tls_errors: tuple[type[BaseException], ...] = (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    )

    async def within(self, seconds: float, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``, raising ``TimeoutError`` if it takes longer than ``seconds``."""
        try:
            with trio.fail_after(seconds):
                return await fn()
        except trio.TooSlowError:
            raise TimeoutError(f"timed out after {seconds}s") from None

    async def aclose(self, conn: Any) -> None:
        """Close what the handler was given: the fd is closed even if the task is cancelled.

        A plain stream's socket is closed at once: ``SocketStream.aclose`` would add a
        checkpoint, a trip through the scheduler for every connection as its task
        ends (10,000 of them in a big stop). A TLS stream is closed with
        ``aclose()``, which says goodbye to the peer first.
        """
        if isinstance(conn, IdleTimeoutStream):
            conn = conn.stream
        if isinstance(conn, trio.SocketStream):
            conn.socket.close()
            return
        outgoing = self._outgoing.pop(conn, None)
        try:
            if outgoing is not None and outgoing.pending:
                # A broken stream (a failed handshake) left its alert unsent; trio
                # drains the BIO after every call that succeeds, so anything here is that.
                with trio.move_on_after(ALERT_GRACE):
                    try:
                        await conn.transport_stream.send_all(outgoing.read())
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            try:
                await conn.aclose()  # closes the transport even when cancelled
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # its socket shut down (the limit shed it, a stop): closed all the same

    def close(self) -> None:
        """End the manager's trio thread, if it runs, and wait for it; restartable."""
        self._close()
