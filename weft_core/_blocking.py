"""The runtime of plain blocking stdlib sockets, for managers that run tasks on OS threads.

``threads`` uses it, and so can any third-party manager whose tasks are threads
(a thread pool, say): ``runtime = weft_core.BLOCKING_RUNTIME``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from ._protocol import SyncRuntime, SyncSlots
from ._spec import HandlerKind
from ._tcpinfo import reset_by_peer

if TYPE_CHECKING:
    import ssl

__all__ = ["BLOCKING_RUNTIME", "BlockingRuntime", "RawShutdown", "WakeableListener"]


class RawShutdown:
    """Shuts a TLS socket's descriptor down without touching its TLS state.

    ``SSLSocket.shutdown`` drops the TLS object, so a reply could no longer be
    written after phase 2 of a stop; the plain system call leaves it intact.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def shutdown(self, how: int) -> None:
        """``shutdown(2)`` on the descriptor; OSError once it is closed."""
        socket.socket.shutdown(self._sock, how)


class WakeableListener(socket.socket):
    """A listening socket whose blocked ``accept()`` another thread can wake.

    A thread blocked in accept() cannot be interrupted, and ``shutdown()`` on the
    listener, which would wake it, also stops the socket for every other process
    sharing it (workers, systemd's copy). So the socket is non-blocking and a
    waiting accept() polls it together with a wake-up pipe: ``wake()`` makes it
    raise ``OSError(EINVAL)``. While connections keep arriving, accept() takes them
    without polling, so a busy listener costs one system call per connection.
    """

    __slots__ = ("_poll", "_wake_r", "_wake_w")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.fileno(), select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)

    def accept(self) -> tuple[socket.socket, Any]:
        """Accept a connection (a blocking socket), waiting until one comes or ``wake()``."""
        while True:
            try:
                # Blocking, as handlers expect: accept4() gives the connection no
                # O_NONBLOCK of the listener's, and without a default timeout the
                # socket object makes no fcntl() calls of its own.
                return super().accept()
            except BlockingIOError:
                pass
            for fd, _events in self._poll.poll():
                if fd == self._wake_r:
                    raise OSError(errno.EINVAL, "the listener was woken to stop accepting")

    def wake(self) -> None:
        """Wake a thread waiting in ``accept()``; safe from any thread, any number of times."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # a full pipe wakes the poller just as well; a closed one has no waiter

    def clear_wake(self) -> None:
        """Forget wakes sent so far, before a new acceptor takes the listener over.

        ``Server.pause_accepting()`` ends the acceptor thread with a wake and keeps
        the listener; the acceptor that ``resume_accepting()`` starts must not see
        that old wake, or it would take it for a broken listener.
        """
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close the socket and the wake-up pipe."""
        super().close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1


class BlockingRuntime(SyncRuntime):
    """Stdlib sockets in blocking mode; slots are a ``threading.Semaphore``.

    Its ``run_in_loop`` is the protocol's default (the calling thread): threads have
    no loop thread to hand a stop's batch to.
    """

    kind: HandlerKind = "sync"
    conn_is_stream = False
    #: Nothing cancels a thread: only TaskShutdown ends a handler as the runtime's doing.
    cancellations: tuple[type[BaseException], ...] | None = ()

    def adopt_listener(self, sock: socket.socket) -> WakeableListener:
        """A :class:`WakeableListener` owning ``sock``'s descriptor (``sock`` is detached)."""
        return WakeableListener(sock)

    def wake_listener(self, listener: WakeableListener) -> None:
        """Make a thread blocked in ``listener.accept()`` return at once."""
        listener.wake()

    def slots(self, n: int) -> SyncSlots:
        """A ``threading.Semaphore`` of ``n``."""
        return threading.Semaphore(n)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)

    def wrap_connection(self, sock: Any) -> Any:
        """The accepted socket itself (a TLS socket on a TLS server).

        Typed as :class:`SyncRuntime`'s: a subclass may hand the handler an object of
        its own (writing-a-manager.md's ``Channel``).
        """
        return sock

    def wrap_tls(
        self, sock: socket.socket, context: ssl.SSLContext
    ) -> tuple[ssl.SSLSocket, RawShutdown]:
        """A server-side SSLSocket (not yet handshaken) and what shuts its descriptor down.

        Its reads take an end of input without close_notify as the end (as
        ``suppress_ragged_eofs`` does) but raise ``ConnectionResetError`` for a
        reset, which the stdlib would report as an end too: a request cut by a
        reset must not look whole (:class:`ResetAwareSSLSocket`). A context whose
        ``sslsocket_class`` is an application's own keeps it, and the stdlib's
        reading.
        """
        import ssl

        try:
            tls = context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
            )
        except OSError as exc:
            _close_half_made(exc)
            raise
        if type(tls) is ssl.SSLSocket:
            tls.__class__ = _reset_aware_class()
        else:
            cast(Any, tls).suppress_ragged_eofs = True  # not in typeshed
        return tls, RawShutdown(tls)

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return "BLOCKING_RUNTIME"


_ResetAware: type | None = None


def _reset_aware_class() -> type:
    """:class:`ResetAwareSSLSocket`'s class, made on first use (``ssl`` only for TLS)."""
    global _ResetAware
    if _ResetAware is None:
        import ssl

        class ResetAwareSSLSocket(ssl.SSLSocket):
            """The stdlib's SSLSocket, whose read tells a reset from an end of input.

            Made with ``suppress_ragged_eofs=False``: an end without close_notify
            raises ``SSLEOFError`` in the stdlib's read, and here becomes the end of
            input (what ``suppress_ragged_eofs`` gives), unless the kernel holds the
            connection as reset. ``recv``, ``recv_into`` and ``makefile`` read
            through ``read``.
            """

            #: Set once a read ended as an end of input: the kernel is asked once, since
            #: asking clears the pending error that told the end from a reset.
            _weft_ended = False

            def read(self, len: int = 1024, buffer: Any = None) -> Any:
                try:
                    return super().read(len, buffer)
                except ssl.SSLEOFError:
                    pass  # raised past this block: no SSLError behind the reset
                if not self._weft_ended and reset_by_peer(self):
                    raise ConnectionResetError(
                        errno.ECONNRESET, "the peer reset the TLS connection"
                    )
                self._weft_ended = True
                return b"" if buffer is None else 0

        _ResetAware = ResetAwareSSLSocket
    return _ResetAware


#: The shared blocking runtime instance.
BLOCKING_RUNTIME = BlockingRuntime()


def _close_half_made(exc: BaseException) -> None:
    """Close the SSLSocket a failed ``wrap_socket`` left half made, holding the descriptor.

    ``SSLSocket._create`` takes the socket's descriptor (the socket is detached), then
    checks that it is connected; on a socket the peer reset it raises without closing
    what it made, so the descriptor stayed open until a collection found it (with a
    ResourceWarning). The half-made socket is the ``self`` of a frame of the traceback.
    """
    import ssl

    tb = exc.__traceback__
    while tb is not None:
        made = tb.tb_frame.f_locals.get("self")
        if isinstance(made, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                made.close()
            return
        tb = tb.tb_next
