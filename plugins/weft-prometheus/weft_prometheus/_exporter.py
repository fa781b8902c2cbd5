"""The scrape endpoint: a small HTTP server in a daemon thread.

Each scrape is answered in a thread of its own (at most ``MAX_SCRAPES`` at once),
bounded by ``SCRAPE_TIMEOUT`` from accept to the last byte of the reply: an idle or
stalled connection cannot delay another scraper, and never pins a thread for
longer. When every slot is taken, the connection that has waited longest without
sending a whole request gives its slot to the newcomer (a scraper sends its request
at once): idle connections cannot shut a scraper out. Only blocking socket calls are used, so under gevent's
monkey-patching the threads are greenlets and the calls yield to the hub. The body
is prometheus-client's ``generate_latest``, rendered at most once per
``RENDER_INTERVAL`` (scrapes in between share it), and never in the hub's thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ._process import claim_endpoint, claimed_by_sibling

if TYPE_CHECKING:
    from gevent.threadpool import ThreadPool

__all__ = ["MAX_REQUEST", "MAX_SCRAPES", "RENDER_INTERVAL", "SCRAPE_TIMEOUT", "Exporter"]

log = logging.getLogger("weft_prometheus")

#: The longest one scrape may take, request and reply: Prometheus' default
#: scrape_timeout is 10 s, so a scraper waits no longer than this anyway.
SCRAPE_TIMEOUT = 10.0
#: A scrape's request line and headers fit in far less; more is not a scraper.
MAX_REQUEST = 8192
#: How long one rendering of the metrics answers scrapes, in seconds: a scrape
#: reports counts at most this old, and a flood of scrapes costs one rendering per
#: interval. Prometheus scrapes every 15 to 60 s.
RENDER_INTERVAL = 1.0
#: Scrapes answered at once: scrapers are few, and a connection that sends nothing
#: (a port scan, a stalled client) holds one of these for SCRAPE_TIMEOUT at most.
MAX_SCRAPES = 8
#: How long a newcomer waits for the slot of the connection shed for it.
_SHED_WAIT = 1.0
#: Backlog of the metrics socket: scrapers are few.
_BACKLOG = 16
#: After an accept error that is not the socket closing (EMFILE), wait this long
#: rather than spin; and how often a worker tries the address its predecessor holds.
_ACCEPT_BACKOFF = 0.1
#: How often the endpoint asks whether its servers still accept (see Exporter).
_RETIRED_CHECK = 0.1
#: How long a worker waits for the address before it says, once, that something else
#: holds it: a process handing over lets go within a tenth of a second of its
#: servers ceasing to accept; this leaves room for a slow one.
HANDOVER_WAIT = 5.0


class Exporter:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` (and ``/``).

    ``reuse_port``: bind with ``SO_REUSEPORT``, so every worker of one supervisor
    listens on the same address and the kernel hands each scrape to one of them.
    One process binds it alone, so that when it hands over to workers (a reload)
    exactly one of the two answers at a time: the workers bind once it lets go
    (:meth:`open_when_free`), and it lets go once ``retired()`` (every server of
    its stopped accepting), checked every ``_RETIRED_CHECK``; the scrapes already
    queued are answered before it stops listening.
    A counter then steps back once, to the workers' sum, rather than jumping
    between two processes' values for the whole drain.

    ``claims``: the workers' shared directory. ``SO_REUSEPORT`` lets any process of
    the same user join a group, so a worker joins one only when the address is free
    or a live worker of the same supervisor claims it there (a file
    ``endpoint-PORT-PID``): another service's metrics, or another service's own
    ``--reuse-port`` listener, given the same address by mistake, are not joined
    (scrapes split between two services; its clients answered with HTTP).

    Error handling: :meth:`open` raises OSError if the address cannot be bound.
    Resource handling: :meth:`close` closes the socket and ends the threads.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        reuse_port: bool,
        retired: Callable[[], bool] = lambda: False,
        claims: Path | None = None,
    ) -> None:
        self._body = _Body(registry)
        self._retired = retired
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        #: Connections whose request is not in yet, oldest first: the ones to shed.
        self._reading: dict[socket.socket, None] = {}
        self._reading_lock = threading.Lock()
        self._where = (host, port)
        self._reuse_port = reuse_port
        self._claims = claims if reuse_port and port else None
        self._claim: Path | None = None
        self._sock: socket.socket | None = None
        self._closed = False

    def _bind(self) -> socket.socket:
        host, port = self._where
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[
            0
        ]
        if self._claims is not None:
            self._claim_or_refuse(family, kind, proto, address)
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(_RETIRED_CHECK)
        return sock

    def _claim_or_refuse(self, family: int, kind: int, proto: int, address: Any) -> None:
        """Claim the address for this service's workers, or raise EADDRINUSE if another holds it.

        Free (a bind without ``SO_REUSEPORT`` succeeds), or claimed by a live sibling:
        this worker claims it too. Else someone else's group holds it.
        """
        assert self._claims is not None
        port = self._where[1]
        if not _free(family, kind, proto, address) and not claimed_by_sibling(self._claims, port):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self._claim = claim_endpoint(self._claims, port)

    def open(self) -> None:
        """Bind and listen, then answer scrapes in a daemon thread."""
        self._start(self._bind())

    @property
    def closed(self) -> bool:
        """True once closed, by :meth:`close` or by letting go of the address."""
        return self._closed

    def open_when_free(self, label: str) -> None:
        """Bind as soon as the process holding the address alone lets go of it.

        Tried every ``_ACCEPT_BACKOFF``. If the address is still taken after
        ``HANDOVER_WAIT``, no process handing over holds it: that is said once, at
        ERROR (``label`` names the address), and the tries go on quietly; a later
        success is said at INFO.
        """

        def wait() -> None:
            said = False
            until = time.monotonic() + HANDOVER_WAIT
            while not self._closed:
                time.sleep(_ACCEPT_BACKOFF)
                try:
                    sock = self._bind()
                except OSError as exc:
                    if not said and time.monotonic() >= until:
                        said = True
                        log.error(
                            "weft-prometheus: cannot serve metrics on %s: %s for %gs, and not "
                            "by a process of this service handing over; serving without them "
                            "until it is free",
                            label,
                            exc.strerror or exc,
                            HANDOVER_WAIT,
                        )
                    continue
                if said:
                    log.info("weft-prometheus: %s is free now: serving metrics there", label)
                self._start(sock)
                return

        threading.Thread(target=wait, name="weft-prometheus bind", daemon=True).start()

    def _start(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            return
        self._sock = sock
        threading.Thread(
            target=self._serve, args=(sock,), name="weft-prometheus", daemon=True
        ).start()
        # The port bound, which a configured port 0 leaves to the kernel.
        host, port = sock.getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("weft-prometheus: serving metrics on http://%s/metrics", where)

    @property
    def port(self) -> int | None:
        """The port bound, or None while closed."""
        return None if self._sock is None else int(self._sock.getsockname()[1])

    def close(self) -> None:
        """Stop listening; a scrape being answered finishes within SCRAPE_TIMEOUT."""
        self._closed = True
        claim, self._claim = self._claim, None
        if claim is not None:
            with contextlib.suppress(OSError):
                claim.unlink()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() the thread waits in
        except OSError:
            pass
        sock.close()

    def _serve(self, sock: socket.socket) -> None:
        while self._sock is sock:
            if self._retired():
                self._let_go(sock)
                return
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._sock is not sock:
                    return
                time.sleep(_ACCEPT_BACKOFF)
                continue
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        if not self._slots.acquire(blocking=False) and not self._shed():
            conn.close()  # MAX_SCRAPES are being answered: not a scraper's pace
            return
        with self._reading_lock:
            self._reading[conn] = None
        threading.Thread(
            target=self._scrape, args=(conn,), name="weft-prometheus scrape", daemon=True
        ).start()

    def _shed(self) -> bool:
        """End the oldest connection still sending its request; True once its slot is ours."""
        with self._reading_lock:
            oldest = next(iter(self._reading), None)
            if oldest is None:
                return False
            del self._reading[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # its thread's recv returns: it lets go
        except OSError:
            pass
        return self._slots.acquire(timeout=_SHED_WAIT)

    def _let_go(self, sock: socket.socket) -> None:
        """Stop listening once retired, answering the scrapes already queued first.

        Closing a listener resets the connections in its accept queue: a scraper
        that had connected would see a reset rather than its answer.
        """
        sock.setblocking(False)
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # BlockingIOError: none left
                break
            self._take(conn)
        self.close()

    def _scrape(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._answer(conn)
        except OSError:  # the scraper went away or was too slow
            pass
        except Exception:
            log.exception("weft-prometheus: cannot answer a scrape")
        finally:
            with self._reading_lock:
                self._reading.pop(conn, None)
            self._slots.release()

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + SCRAPE_TIMEOUT
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:  # bare LF: HTTP/1.1 allows it
            if len(head) > MAX_REQUEST:
                return self._reply(conn, deadline, b"431 Request Header Fields Too Large")
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = conn.recv(4096)
            if not chunk:
                return None
            head += chunk
        with self._reading_lock:
            self._reading.pop(conn, None)  # a whole request: answered, not shed
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return self._reply(conn, deadline, b"405 Method Not Allowed")
        if path not in (b"/metrics", b"/"):
            return self._reply(conn, deadline, b"404 Not Found")
        body = self._body.latest()
        return self._reply(
            conn, deadline, b"200 OK", body, CONTENT_TYPE_LATEST, send_body=method == b"GET"
        )

    @staticmethod
    def _reply(
        conn: socket.socket,
        deadline: float,
        status: bytes,
        body: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
        *,
        send_body: bool = True,
    ) -> None:
        if body is None:  # an error: its status line says it all
            body = status + b"\n"
        head = (
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, content_type.encode(), len(body))
        )
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        conn.sendall(head + body if send_body else head)  # the timeout bounds the whole call


class _Body:
    """The registry's exposition, rendered at most once per ``RENDER_INTERVAL``.

    Scrapes that arrive while it renders wait for that rendering and share it. The
    lock is made as the endpoint's threads are (a greenlet's lock under gevent's
    patching), since they hold it while the rendering runs.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._text = b""
        self._since: float | None = None  # when the rendering of _text began

    def latest(self) -> bytes:
        """The exposition text, rendered anew if the last rendering began an interval ago."""
        with self._lock:
            now = time.monotonic()
            if self._since is None or now - self._since >= RENDER_INTERVAL:
                self._text = _render(self._registry)
                self._since = now
            return self._text


def _free(family: int, kind: int, proto: int, address: Any) -> bool:
    """True if nobody listens on ``address`` now: a bind without SO_REUSEPORT succeeds."""
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        probe.close()
    return True


def _render(registry: CollectorRegistry) -> bytes:
    """``generate_latest(registry)``, in an OS thread of gevent's pool under its patching.

    Patched, the endpoint's threads are greenlets of the hub that serves every
    connection: rendering there would hold them all up. The greenlet waits for the
    pool's thread without holding the hub.
    """
    pool = _os_thread_pool()
    if pool is None:
        return generate_latest(registry)
    body: bytes = pool.apply(generate_latest, (registry,))
    return body


def _os_thread_pool() -> ThreadPool | None:
    """The current hub's pool of OS threads if gevent has patched ``threading``, else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    import gevent

    return gevent.get_hub().threadpool
