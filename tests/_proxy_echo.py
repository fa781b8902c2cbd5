"""Handlers for the HAProxy tests: report the peer weft saw, then answer slowly or echo.

``handle``: sends ``<server pid> <peer>\\n``; then for each line received, says
``+`` at once (so a test knows the exchange has reached the server), waits ``DELAY``
seconds (even while the server drains: an exchange in flight completes) and sends
the line back. ``handle_asyncio`` is the same for the asyncio manager.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from weft_core import current_connection

DELAY = 1.0


def handle(conn: socket.socket) -> None:
    info = current_connection()
    conn.sendall(f"{os.getpid()} {info.peer_str}\n".encode())
    reader = conn.makefile("rb")
    try:
        for line in reader:
            conn.sendall(b"+")
            time.sleep(DELAY)  # a slow reply that a graceful stop must let finish
            conn.sendall(line)
    finally:
        reader.close()


async def handle_asyncio(stream: Any) -> None:
    """:func:`handle` for the asyncio manager (``stream`` is a weft_asyncio.AsyncioStream)."""
    import asyncio

    info = current_connection()
    await stream.send_all(f"{os.getpid()} {info.peer_str}\n".encode())
    while line := await stream.readline():
        await stream.send_all(b"+")
        await asyncio.sleep(DELAY)  # a slow reply that a graceful stop must let finish
        await stream.send_all(line)
