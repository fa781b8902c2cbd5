"""Handlers that ``weft serve`` imports in the tests (found through PYTHONPATH).

Each connection first gets the serving process's pid on a line of its own, so a
test can tell which worker served it. Then ``boom`` makes the handler raise;
anything else is echoed back until the client closes.
"""

from __future__ import annotations

import os
import time
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


#: How long ``linger`` stays after its client's end of input: a drain to scrape.
LINGER = 3.0


def linger(conn: Any) -> None:
    """``handle``, then LINGER seconds more: a stop's drain that lasts (threads)."""
    handle(conn)
    time.sleep(LINGER)
