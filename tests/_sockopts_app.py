"""Handlers that answer with their connection's TCP_NODELAY and SO_KEEPALIVE.

For tests/test_queued_clients.py. With ``WEFT_TEST_GATE=PATH`` set, importing this
module in a ``weft serve`` worker waits, at most 20 s, for PATH to exist (writing
``PATH.<pid>`` first, so the test knows it waits): clients connect meanwhile and
queue on the socket the supervisor bound. The supervisor, whose parent is the test
(``WEFT_TEST_GATE_PARENT``), does not wait.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

_gate = os.environ.get("WEFT_TEST_GATE")
if _gate and str(os.getppid()) != os.environ.get("WEFT_TEST_GATE_PARENT"):
    Path(f"{_gate}.{os.getpid()}").write_text("importing")
    _deadline = time.monotonic() + 20
    while not Path(_gate).exists() and time.monotonic() < _deadline:
        time.sleep(0.02)


def _options(get: Any) -> bytes:
    nodelay = get(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    keepalive = get(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return b"nodelay=%d keepalive=%d\n" % (nodelay, keepalive)


def handle(conn: Any) -> None:
    conn.sendall(_options(conn.getsockopt))


async def handle_async(stream: Any) -> None:
    await stream.send_all(_options(stream.getsockopt))
