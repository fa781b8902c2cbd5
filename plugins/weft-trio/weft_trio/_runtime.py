"""TrioRuntime: the trio-native operations weft's server needs (``AsyncRuntime``).

The server's one accept loop and one connection wrapper, written once in
``weft_core``, run inside :class:`~weft_trio.TrioManager`'s trio thread through
this object: it adopts the listening socket as a trio socket, counts connection
slots on a ``trio.Semaphore``, and wraps each accepted socket in a
``trio.SocketStream``, which is what a handler receives.

What does not live here: the trio thread itself and the tasks (``_manager.py``).
Every coroutine and every slot method below must run in that thread; only
:meth:`TrioRuntime.close` may be called from anywhere.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Literal

import trio

__all__ = ["TrioRuntime", "TrioSlots"]


class TrioSlots:
    """Connection slots on a ``trio.Semaphore``; use them from the manager's trio thread."""

    __slots__ = ("_semaphore",)

    def __init__(self, n: int) -> None:
        self._semaphore = trio.Semaphore(n)

    def __repr__(self) -> str:
        return f"<TrioSlots free={self._semaphore.value}>"

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free; True if taken. Not a checkpoint."""
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
        """Free one slot, waking the longest waiter."""
        self._semaphore.release()


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

    def __init__(self, close: Callable[[], None]) -> None:
        self._close = close

    def __repr__(self) -> str:
        return "<TrioRuntime>"

    def adopt_listener(self, sock: socket.socket) -> trio.socket.SocketType:
        """The listening socket as a trio socket (non-blocking); ``await accept()`` on it.

        Takes ownership of ``sock``: closing the returned object closes it.
        """
        return trio.socket.from_stdlib_socket(sock)

    def slots(self, n: int) -> TrioSlots:
        """A ``trio.Semaphore`` of ``n`` slots."""
        return TrioSlots(n)

    async def sleep(self, seconds: float) -> None:
        """``trio.sleep``."""
        await trio.sleep(seconds)

    def wrap_connection(self, sock: trio.socket.SocketType) -> trio.SocketStream:
        """``trio.SocketStream(sock)``, what the handler receives.

        trio turns ``TCP_NODELAY`` on for every TCP ``SocketStream``.
        """
        return trio.SocketStream(sock)

    async def aclose(self, conn: trio.SocketStream) -> None:
        """``await conn.aclose()``: the fd is closed even if the task is cancelled."""
        await conn.aclose()

    def close(self) -> None:
        """End the manager's trio thread, if it runs, and wait for it; restartable."""
        self._close()
