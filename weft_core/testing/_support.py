"""Helpers the conformance suite shares: clients, waiting, fd counting."""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = [
    "WAIT",
    "add_task_from_a_thread",
    "connect",
    "fd_count",
    "recv_exactly",
    "recv_until_closed",
    "wait_until",
]

#: The longest any single wait in the suite lasts before it fails the test; generous
#: so that a loaded CI machine does not fail a correct manager.
WAIT = 10.0


#: What a message adds when a client was served (or could connect) where the acceptor
#: should have ended: the cause is the manager's, far from where the test sees it.
ACCEPTOR_STILL_ACCEPTS = (
    "; the acceptor task still accepts: pause_accepting() and stop_accepting() end it "
    "with stop_task(acceptor, timeout=0), so your stop_task must interrupt (kill or "
    "cancel) a task once its timeout is out, or your runtime's wake_listener must make "
    "a listener.accept() that waits return (and never shutdown() the listener: other "
    "processes may share it); a wake left pending ends the next acceptor at once unless "
    "WakeableListener.clear_wake() (or your own) takes it back"
)


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def add_task_from_a_thread(
    manager: Any, thunk: Callable[[], Any], wait: float
) -> tuple[threading.Thread, list[Hashable]]:
    """``manager.add_task(thunk)`` in a thread of its own, waited for up to ``wait``.

    The caller's contextvars go with it. Returns the thread (alive if add_task has
    not returned: it runs the task in the calling thread) and, once it returned,
    the task's id in the list.
    """
    returned: list[Hashable] = []
    caller = threading.Thread(
        target=contextvars.copy_context().run,
        args=(lambda: returned.append(manager.add_task(thunk)),),
        daemon=True,
    )
    caller.start()
    caller.join(wait)
    return caller, returned


def connect(port: int | str, host: str = "127.0.0.1") -> socket.socket:
    """A client socket connected to the server, with a timeout so a test cannot hang."""
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes, or fail if the server closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes: {data!r}")
        data += chunk
    return data


def recv_until_closed(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (EOF or reset)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))
