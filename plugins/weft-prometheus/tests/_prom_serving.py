"""Handlers that ``weft serve`` imports in the tests (found through PYTHONPATH).

Each connection first gets the serving process's pid on a line of its own, so a
test can tell which worker served it. Then ``boom`` makes the handler raise;
anything else is echoed back until the client closes.
"""

from __future__ import annotations

import os
from typing import Any

BOOM = b"boom\n"


def handle(conn: Any) -> None:
    """The sync flavour (threads, gevent): ``conn`` is a socket."""
    conn.sendall(b"%d\n" % os.getpid())
    while data := conn.recv(65536):
        if data == BOOM:
            raise ValueError("asked to fail")
        conn.sendall(data)


async def handle_async(stream: Any) -> None:
    """The async flavour (trio, asyncio): the methods both streams share."""
    await stream.send_all(b"%d\n" % os.getpid())
    while data := await stream.receive_some(65536):
        if data == BOOM:
            raise ValueError("asked to fail")
        await stream.send_all(data)
