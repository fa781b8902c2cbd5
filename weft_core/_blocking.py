"""The runtime of plain blocking stdlib sockets, for managers that run tasks on OS threads.

``threads`` uses it, and so can any third-party manager whose tasks are threads
(a thread pool, say): ``runtime = weft_core.BLOCKING_RUNTIME``.
"""

from __future__ import annotations

import socket
import threading
import time

from ._protocol import SyncSlots
from ._spec import HandlerKind

__all__ = ["BLOCKING_RUNTIME", "BlockingRuntime"]


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

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return "BLOCKING_RUNTIME"


#: The shared blocking runtime instance.
BLOCKING_RUNTIME = BlockingRuntime()
