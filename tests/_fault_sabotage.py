"""A handler module for ``weft serve`` that breaks its own server's listener.

Importing it arms a trigger: once ``weft serve`` logs ``listening on HOST:PORT``, a
thread puts ``/dev/null`` over the listening descriptor (``dup2``), so the next
``accept()`` fails with ENOTSOCK, a fatal accept error, and then connects to the
port to make the acceptor call ``accept()``. The server must stop itself and
``weft serve`` exit 1 with a one-line message naming the address.

A duplicate of the listening socket is kept open on purpose: epoll (trio, gevent)
forgets a registration only when the last descriptor of the open socket closes, so
with the duplicate alive the waiting acceptor is woken by the connection, calls
``accept()`` on the descriptor, and meets ENOTSOCK, as it would for real. Without
it the socket would vanish silently and the acceptor wait forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any


def echo(conn: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


async def echo_async(stream: Any) -> None:
    async for data in stream:
        await stream.send_all(data)


def _listening_fd(port: int) -> int:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(fd)) as probe:
                listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                if listening and probe.getsockname()[1] == port:
                    return fd
        except OSError:  # gone meanwhile
            continue
    raise LookupError(f"no listening socket on port {port}")


def _sabotage(port: int) -> None:
    fd = _listening_fd(port)
    keep = os.dup(fd)  # see the module docstring
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    _ = keep  # left open until the process exits


class _Trigger(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "listening on %s (manager %s)":
            port = int(str(record.args[0]).rpartition(":")[2])  # type: ignore[index]
            threading.Thread(target=_sabotage, args=(port,), daemon=True).start()


logging.getLogger("weft").addHandler(_Trigger())
