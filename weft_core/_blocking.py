"""The runtime of plain blocking stdlib sockets, for managers that run tasks on OS threads.

``threads`` uses it, and so can any third-party manager whose tasks are threads
(a thread pool, say): ``runtime = weft_core.BLOCKING_RUNTIME``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

from ._protocol import SyncSlots
from ._spec import HandlerKind

if TYPE_CHECKING:
    import ssl

__all__ = ["BLOCKING_RUNTIME", "BlockingRuntime", "RawShutdown"]


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


class BlockingRuntime:
    """Stdlib sockets in blocking mode; slots are a ``threading.Semaphore``."""

    kind: HandlerKind = "sync"
    conn_is_stream = False

    def adopt_listener(self, sock: socket.socket) -> socket.socket:
        """The listening socket itself, in blocking mode (one accept() per connection)."""
        sock.setblocking(True)
        return sock

    def slots(self, n: int) -> SyncSlots:
        """A ``threading.Semaphore`` of ``n``."""
        return threading.Semaphore(n)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(seconds)

    def wrap_connection(self, sock: socket.socket) -> socket.socket:
        """The accepted socket itself."""
        return sock

    def wrap_tls(
        self, sock: socket.socket, context: ssl.SSLContext
    ) -> tuple[ssl.SSLSocket, RawShutdown]:
        """A server-side SSLSocket (not yet handshaken) and what shuts its descriptor down."""
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, RawShutdown(tls)

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return "BLOCKING_RUNTIME"


#: The shared blocking runtime instance.
BLOCKING_RUNTIME = BlockingRuntime()
