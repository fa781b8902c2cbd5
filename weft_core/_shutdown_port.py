r"""The shutdown port (Sagittarius' ``shutdown-port``): stop a server by connecting to it.

``Server(shutdown_port=N)`` opens a second listener on 127.0.0.1 only. A client
that connects to it, sends ``shutdown_secret`` as one line when a secret is set,
and is approved by ``shutdown_handler(server, conn)`` when one is given, gets
``OK\n`` and the server stops gracefully (``server.stop()``, in a thread of its
own, since the request must not wait for the stop it caused). Anybody else gets
``DENIED\n``, is logged at WARNING with their address, and nothing stops.

The listener is a plain daemon thread with a blocking socket, independent of the
server's task manager: it needs no plugin, works the same on every manager, and
answers even when the manager's runtime is saturated. Requests are served one at
a time; they are rare and short.

What lives here: the listener and the request protocol. When it opens and closes
(``Server.run()`` and ``Server.stop()``) is the Server's business.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _acceptpolicy as policy
from ._connection import format_address
from ._errors import BindError

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["SHUTDOWN_HOST", "ShutdownHandler", "ShutdownPort"]

log = logging.getLogger("weft.shutdown")

#: ``shutdown_handler(server, conn) -> bool``: True stops the server.
ShutdownHandler = Callable[["Server", socket.socket], object]

#: Loopback only: the shutdown port is a tool for the machine's own operators,
#: never a network service (Sagittarius binds it the same way).
SHUTDOWN_HOST = "127.0.0.1"
#: How long a client has to send the secret line. Requests are served one at a
#: time, so a silent client must not hold the port for long.
SECRET_TIMEOUT = 5.0
#: The longest secret line read; anything longer is a wrong secret.
MAX_SECRET_LINE = 4096
#: Shutdown requests are rare: a small listen queue is plenty.
BACKLOG = 8
#: How long ``close()`` waits for the listener thread to end; it is woken at once,
#: and a request in progress has its connection shut down.
CLOSE_WAIT = 5.0

OK = b"OK\n"
DENIED = b"DENIED\n"


class ShutdownPort:
    """A loopback listener that stops ``server`` on an approved request.

    Resource handling: :meth:`open` binds (raising :class:`BindError`), :meth:`start`
    starts the thread, :meth:`close` (idempotent, callable from any thread, even
    from a ``shutdown_handler``) closes the listener and waits for the thread.
    """

    def __init__(
        self,
        server: Server,
        port: int,
        secret: str | None = None,
        handler: ShutdownHandler | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.secret = None if secret is None else secret.encode()
        self.handler = handler
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._client: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.address: str | None = None

    def open(self) -> None:
        """Bind and listen on 127.0.0.1:``port``; raises BindError naming the address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((SHUTDOWN_HOST, self.port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise BindError(
                exc.errno,
                f"cannot listen for shutdown requests on {SHUTDOWN_HOST}:{self.port} "
                f"(shutdown_port): {exc.strerror}",
            ) from exc
        self._sock = sock
        self.address = format_address(sock.getsockname())

    def start(self) -> None:
        """Serve requests in a daemon thread."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("open() the shutdown port before starting it")
        self._thread = threading.Thread(
            target=self._serve,
            args=(sock,),
            name=f"weft shutdown port {self.address}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Close the listener (and a request in progress); wait for the thread to end."""
        with self._lock:
            sock, self._sock = self._sock, None
            client = self._client
            self._closing.set()
        if sock is None:
            return
        self.address = None
        thread = self._thread
        inside = thread is threading.current_thread()  # a shutdown_handler calling stop()
        # Linux: a pending accept() fails at once; a request waiting for its secret
        # ends, unless it is the one closing us (it still has to answer).
        for one, how in ((sock, socket.SHUT_RD), (None if inside else client, socket.SHUT_RDWR)):
            if one is not None:
                try:
                    one.shutdown(how)
                except OSError:
                    pass
        if thread is not None and not inside:
            thread.join(CLOSE_WAIT)
            if thread.is_alive():
                log.warning("the shutdown port's thread did not end within %ss", CLOSE_WAIT)
        sock.close()

    # -- the listener thread ------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        backoff = policy.Backoff()
        while not self._closing.is_set():
            try:
                conn, addr = sock.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                action = policy.classify_accept_error(exc)
                if action is policy.AcceptAction.SKIP:
                    continue
                if action is policy.AcceptAction.BACKOFF:
                    delay = backoff.next()
                    log.warning("shutdown port: accept failed (%s); retrying in %.2fs", exc, delay)
                    time.sleep(delay)
                    continue
                log.error("shutdown port: accept failed (%s); the shutdown port is closed", exc)
                return
            backoff.reset()
            with self._lock:
                if self._closing.is_set():
                    conn.close()
                    return
                self._client = conn
            try:
                self._request(conn, format_address(addr))
            finally:
                with self._lock:
                    self._client = None
                conn.close()

    def _request(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(SECRET_TIMEOUT)
        refusal = self._refusal(conn)
        if refusal is not None:
            log.warning("shutdown port: denied a request from %s: %s", peer, refusal)
            _send_quietly(conn, DENIED)
            return
        log.warning("shutdown port: %s asked the server to stop; stopping", peer)
        _send_quietly(conn, OK)
        # stop() waits for the connections and closes this port (joining this
        # thread), so it runs in a thread of its own. Not a daemon: the program
        # must not exit in the middle of the stop (on_stop, hooks).
        threading.Thread(target=self.server.stop, name="weft shutdown-port stop").start()

    def _refusal(self, conn: socket.socket) -> str | None:
        """Why the request is refused, or None to stop the server."""
        if self.secret is not None:
            line = _read_line(conn)
            if line is None:
                return f"no secret line within {SECRET_TIMEOUT}s"
            import hmac  # only when a secret is set

            if not hmac.compare_digest(line, self.secret):
                return "wrong secret"
        if self.handler is not None:
            try:
                if not self.handler(self.server, conn):
                    return "shutdown_handler said no"
            except Exception:
                log.exception("shutdown_handler %r raised; the request is denied", self.handler)
                return "shutdown_handler raised"
        return None


def _read_line(conn: socket.socket) -> bytes | None:
    r"""One line without its ``\n`` (or ``\r\n``); None on timeout, EOF or overlong input.

    Reads a byte at a time so that nothing past the line is consumed: a
    ``shutdown_handler`` may read what the client sends next.
    """
    line = bytearray()
    try:
        while len(line) <= MAX_SECRET_LINE:
            byte = conn.recv(1)
            if not byte:
                return None
            if byte == b"\n":
                return bytes(line[:-1] if line.endswith(b"\r") else line)
            line += byte
    except OSError:  # TimeoutError, or the port was closed under us
        return None
    return None


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass
