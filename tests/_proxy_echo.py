"""Handlers for the HAProxy tests: report the peer weft saw, then answer slowly or echo.

``handle``: sends ``<server pid> <peer>\\n``; then for each line received, says
``+`` at once (so a test knows the exchange has reached the server), waits ``DELAY``
seconds (even while the server drains: an exchange in flight completes) and sends
the line back.
"""

from __future__ import annotations

import os
import socket
import time

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
