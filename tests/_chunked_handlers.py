"""A reply in chunks, for ``weft serve`` tests of what a stop lets finish.

On a line, each handler sends ``chunk-0`` to ``chunk-9``, one every 0.2 s (a 2-second
reply), then waits for its client to close.
"""

from __future__ import annotations

import time
from typing import Any

from _stuck_handlers import runtime_sleep

CHUNKS = 10
PAUSE = 0.2


def chunks(conn: Any) -> None:
    if not conn.recv(100):
        return
    for i in range(CHUNKS):
        time.sleep(PAUSE)
        conn.sendall(b"chunk-%d\n" % i)
    while conn.recv(100):
        pass


async def chunks_async(stream: Any) -> None:
    if not await stream.receive_some(100):
        return
    sleep = runtime_sleep()
    for i in range(CHUNKS):
        await sleep(PAUSE)
        await stream.send_all(b"chunk-%d\n" % i)
    while await stream.receive_some(100):
        pass
