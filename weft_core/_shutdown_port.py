r"""The shutdown port (Sagittarius' ``shutdown-port``): stop a server by connecting to it.

``Server(shutdown_port=N)`` (or the supervisor of ``weft serve --workers``) opens a
second listener on 127.0.0.1 only. A client that connects to it, sends
``shutdown_secret`` as one line when a secret is set, and is approved by
``shutdown_handler(server, conn)`` when one is given, gets ``OK\n`` and the owner
stops gracefully (``owner.stop()``, in a thread of its own, since the request must
not wait for the stop it caused). Anybody else gets ``DENIED\n`` and nothing stops.

Hardened against a hostile local peer (issue 14):

- No secret and no ``shutdown_handler``: refused when the server is built, unless
  ``shutdown_allow_no_secret`` says so, and then a WARNING at start
  (:func:`check_allow_no_secret`).
- Wrong guesses are throttled per source address, and for all sources together
  (:class:`Throttle`): a blocked source's connections are closed at once, unread.
- Each request is served in a thread of its own with one deadline for the secret
  line, so a silent or trickling client holds nobody else up; at most
  ``MAX_CLIENTS`` are served at once, further ones are closed at once.
- Denials, blocks and refusals are logged at a bounded rate.

The acceptor is a plain daemon thread with a blocking socket, independent of the
server's task manager: it needs no plugin, works the same on every manager, and
answers even when the manager's runtime is saturated.

What lives here: the listener, the request protocol and its throttle. When it opens
and closes is its owner's business (``Server.run()``/``stop()``, or ``_workers``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import _acceptpolicy as policy
from ._connection import format_address
from ._errors import BindError, ConfigError

if TYPE_CHECKING:
    from ._server import Server

__all__ = [
    "SHUTDOWN_HOST",
    "ShutdownHandler",
    "ShutdownPort",
    "Throttle",
    "check_allow_no_secret",
]

log = logging.getLogger("weft.shutdown")

#: ``shutdown_handler(server, conn) -> bool``: True stops the server.
ShutdownHandler = Callable[["Server", socket.socket], object]

#: Loopback only: the shutdown port is a tool for the machine's own operators,
#: never a network service (Sagittarius binds it the same way).
SHUTDOWN_HOST = "127.0.0.1"
#: How long a client has, from its connection, to send the whole secret line. One
#: deadline, not one per read, so a client trickling a byte at a time gets no longer.
SECRET_TIMEOUT = 5.0
#: The longest secret line read; anything longer is a wrong secret.
MAX_SECRET_LINE = 4096
#: Requests served at once, each in its own thread. Beyond it, a connection is
#: closed at once: an operator's request takes milliseconds, so eight slots held by
#: silent clients (each for at most SECRET_TIMEOUT) is already a deliberate attack.
MAX_CLIENTS = 8
#: Shutdown requests are rare: a small listen queue is plenty.
BACKLOG = 8
#: How long ``close()`` waits for the threads to end; they are woken at once (the
#: listener and every connection in progress are shut down).
CLOSE_WAIT = 5.0

#: Failed attempts in a row after which one source address is blocked: room for an
#: operator's typos, none for guessing (~4,000 guesses a second unthrottled).
FREE_FAILURES = 5
#: The same for all sources together. Any local process can connect from any
#: address in 127.0.0.0/8, so a guesser could otherwise rotate addresses.
ALL_SOURCES_FREE_FAILURES = 50
#: A block lasts BLOCK_MIN after the FREE_FAILURES-th failure, twice as long after
#: each further one (a failure needs the block to have ended), up to BLOCK_MAX.
BLOCK_MIN = 1.0
BLOCK_MAX = 60.0
#: A source with no failure for this long starts afresh.
FORGET_AFTER = 600.0
#: Sources remembered at once; beyond it the one whose last failure is oldest is
#: forgotten (the all-sources count still holds a guesser back).
MAX_SOURCES = 1024
#: The key of the all-sources record.
_ALL = "*"

OK = b"OK\n"
DENIED = b"DENIED\n"


class _Owner(Protocol):
    """What the shutdown port stops: a Server, or the supervisor of workers."""

    def stop(self) -> object:
        """Stop gracefully."""


def check_allow_no_secret(port: object, secret: object, handler: object, allow: object) -> bool:
    """Check ``shutdown_allow_no_secret``; refuse a shutdown port anybody may use.

    Without ``shutdown_secret`` and ``shutdown_handler``, any local process (every
    user, every container in the network namespace, a request forgery) can stop the
    server by connecting: that needs ``shutdown_allow_no_secret=True``. Raises
    ConfigError; returns ``allow``.
    """
    if not isinstance(allow, bool):
        raise ConfigError(f"expected true or false, got {allow!r}", key="shutdown_allow_no_secret")
    if port is not None and secret is None and handler is None and not allow:
        raise ConfigError(
            "shutdown_port without a secret lets any local process stop the server;"
            " set shutdown_secret, or shutdown_allow_no_secret = true to accept that",
            key="shutdown_port",  # the key that was set: its source is the one named
        )
    return allow


@dataclass
class _Record:
    failures: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


class Throttle:
    """Failed shutdown requests by source address, and for all sources together.

    At ``FREE_FAILURES`` failures in a row a source is blocked for ``BLOCK_MIN``,
    after each further failure twice as long, up to ``BLOCK_MAX``; all sources
    together likewise after ``ALL_SOURCES_FREE_FAILURES``. Not thread-safe: the
    shutdown port calls it under its lock. ``clock`` is for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def blocked_for(self, source: str) -> float:
        """Seconds left of the block on ``source`` (or on all sources); 0.0 if none."""
        now = self._clock()
        left = 0.0
        for key in (source, _ALL):
            record = self._records.get(key)
            if record is not None:
                left = max(left, record.blocked_until - now)
        return left

    def failed(self, source: str) -> float:
        """Count a failure from ``source``; return the block it starts (0.0 for none)."""
        now = self._clock()
        block = 0.0
        for key, free in ((source, FREE_FAILURES), (_ALL, ALL_SOURCES_FREE_FAILURES)):
            record = self._record(key, now)
            record.failures += 1
            record.last = now
            beyond = record.failures - free  # 0 for the last free one: blocked from here
            if beyond >= 0:
                length = min(BLOCK_MIN * 2 ** min(beyond, 32), BLOCK_MAX)
                record.blocked_until = now + length
                block = max(block, length)
        return block

    def succeeded(self, source: str) -> None:
        """Forget ``source``'s failures (it knew the secret)."""
        self._records.pop(source, None)

    def _record(self, key: str, now: float) -> _Record:
        record = self._records.get(key)
        if record is not None and now - record.last >= FORGET_AFTER:
            record = None
        if record is None:
            if len(self._records) > MAX_SOURCES:
                stalest = min(
                    (k for k in self._records if k != _ALL), key=lambda k: self._records[k].last
                )
                del self._records[stalest]
            record = self._records[key] = _Record()
        return record


class ShutdownPort:
    """A loopback listener that stops ``owner`` on an approved request.

    ``owner`` is what stops (``owner.stop()``, or ``stop()`` when given) and what
    ``handler(owner, conn)`` is given. Resource handling: :meth:`open` binds
    (raising :class:`BindError`), :meth:`start` starts the thread, :meth:`close`
    (idempotent, callable from any thread, even from a ``shutdown_handler``) closes
    the listener and every connection in progress, and waits for their threads.
    """

    def __init__(
        self,
        owner: _Owner,
        port: int,
        secret: str | None = None,
        handler: ShutdownHandler | None = None,
        *,
        allow_no_secret: bool = False,
        stop: Callable[[], object] | None = None,
    ) -> None:
        self.server = owner
        #: What an approved request calls: ``owner.stop`` unless told otherwise
        #: (weft serve stops as on SIGTERM, bounded by its graceful timeout).
        self.stop = owner.stop if stop is None else stop
        self.port = port
        self.secret = None if secret is None else secret.encode()
        self.handler: Callable[[Any, socket.socket], object] | None = handler
        check_allow_no_secret(port, secret, handler, allow_no_secret)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._throttle = Throttle()
        self._denied_log = policy.RateLimitedLog(log)
        self._blocked_log = policy.RateLimitedLog(log)
        self._busy_log = policy.RateLimitedLog(log)
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
        """Serve requests in a daemon thread; log that the port is open, and to whom."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("open() the shutdown port before starting it")
        if self.secret is None and self.handler is None:
            log.warning(
                "shutdown port on %s has no secret (shutdown_allow_no_secret): any local"
                " process can stop the server by connecting to it",
                self.address,
            )
        else:
            log.info("shutdown port listening on %s", self.address)
        self._thread = threading.Thread(
            target=self._serve,
            args=(sock,),
            name=f"weft shutdown port {self.address}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Close the listener and the requests in progress; wait for their threads."""
        me = threading.current_thread()  # a shutdown_handler calling stop() runs in one
        with self._lock:
            sock, self._sock = self._sock, None
            self._closing.set()
            if sock is None:
                return
            # Linux: a pending accept() fails at once; a request waiting for its
            # secret ends, unless it is the one closing us (it still has to answer).
            _shutdown_quietly(sock, socket.SHUT_RD)
            for conn, client in self._clients.items():
                if client is not me:
                    _shutdown_quietly(conn, socket.SHUT_RDWR)
            threads = [t for t in (self._thread, *self._clients.values()) if t not in (None, me)]
        self.address = None
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "the shutdown port's thread %r did not end within %ss", thread.name, CLOSE_WAIT
                )
        sock.close()

    # -- the acceptor thread --------------------------------------------------------------

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
            self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        """Serve ``conn`` in a thread of its own, or close it at once (blocked, or busy)."""
        source = str(addr[0])
        with self._lock:
            if self._closing.is_set():
                conn.close()
                return
            blocked = self._throttle.blocked_for(source)
            if blocked > 0:
                self._blocked_log(
                    logging.WARNING,
                    "shutdown port: closed a connection from %s unread: blocked for"
                    " another %.1fs after too many failed requests",
                    source,
                    blocked,
                )
                conn.close()
                return
            if len(self._clients) >= MAX_CLIENTS:
                self._busy_log(
                    logging.WARNING,
                    "shutdown port: closed a connection from %s unread: %d requests in"
                    " progress already",
                    source,
                    MAX_CLIENTS,
                )
                conn.close()
                return
            thread = threading.Thread(
                target=self._serve_one,
                args=(conn, source, format_address(addr)),
                name=f"weft shutdown request {format_address(addr)}",
                daemon=True,
            )
            self._clients[conn] = thread
        thread.start()

    def _serve_one(self, conn: socket.socket, source: str, peer: str) -> None:
        try:
            self._request(conn, source, peer)
        finally:
            with self._lock:
                del self._clients[conn]
            conn.close()

    def _request(self, conn: socket.socket, source: str, peer: str) -> None:
        refusal, counts = self._refusal(conn)
        if refusal is not None:
            with self._lock:
                block = self._throttle.failed(source) if counts else 0.0
                self._denied_log(
                    logging.WARNING, "shutdown port: denied a request from %s: %s", peer, refusal
                )
                if block > 0:
                    self._blocked_log(
                        logging.WARNING,
                        "shutdown port: %s is blocked for %.1fs after too many failed requests",
                        source,
                        block,
                    )
            _send_quietly(conn, DENIED)
            return
        with self._lock:
            self._throttle.succeeded(source)
        log.warning("shutdown port: %s asked the server to stop; stopping", peer)
        _send_quietly(conn, OK)
        # A Server's stop() waits for the connections and closes this port (joining
        # this thread), so it runs in a thread of its own. Not a daemon: the program
        # must not exit in the middle of the stop (on_stop, hooks).
        threading.Thread(target=self.stop, name="weft shutdown-port stop").start()

    def _refusal(self, conn: socket.socket) -> tuple[str | None, bool]:
        """Why the request is refused (None to stop), and whether it counts as a guess."""
        if self.secret is not None:
            line = _read_line(conn, time.monotonic() + SECRET_TIMEOUT)
            if line is None:
                return f"no secret line within {SECRET_TIMEOUT}s", True
            import hmac  # only when a secret is set

            if not hmac.compare_digest(line, self.secret):
                return "wrong secret", True
        if self.handler is not None:
            conn.settimeout(SECRET_TIMEOUT)
            try:
                if not self.handler(self.server, conn):
                    # With a secret, the client knew it: the handler's no is no guess.
                    return "shutdown_handler said no", self.secret is None
            except Exception:
                log.exception("shutdown_handler %r raised; the request is denied", self.handler)
                return "shutdown_handler raised", self.secret is None
        return None, False


def _read_line(conn: socket.socket, deadline: float) -> bytes | None:
    r"""One line without its ``\n`` (or ``\r\n``) by ``deadline``; None on timeout, EOF or overlong input.

    Reads a byte at a time so that nothing past the line is consumed: a
    ``shutdown_handler`` may read what the client sends next.
    """
    line = bytearray()
    try:
        while len(line) <= MAX_SECRET_LINE:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
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


def _shutdown_quietly(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass
