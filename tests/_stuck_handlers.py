"""Handlers for ``weft serve`` that ignore every way a stop can reach them.

Each says ``+`` and then waits on something no manager can interrupt: a plain
``threading.Event`` (not the runtime's). On threads that holds the thread; on an
event loop (an unpatched gevent hub, trio) it blocks the whole loop, the worst a
handler can do to a stop.
"""

from __future__ import annotations

import threading
from typing import Any

_never = threading.Event()


def stuck(conn: Any) -> None:
    conn.sendall(b"+")
    _never.wait(3600)


async def stuck_async(stream: Any) -> None:
    await stream.send_all(b"+")
    _never.wait(3600)
