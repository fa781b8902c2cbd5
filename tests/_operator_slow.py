"""A handler module whose import blocks until a file exists (a slow application start).

``weft serve _operator_slow:handle`` with ``SLOW_START_FLAG=PATH``: the import writes
``PATH.importing`` and then waits (at most 20 s) for ``PATH`` to exist, so a test can
send a signal while ``weft serve`` is starting, before it listens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_flag = os.environ.get("SLOW_START_FLAG")
if _flag:
    Path(_flag + ".importing").write_text(str(os.getpid()))
    _deadline = time.monotonic() + 20
    while not Path(_flag).exists() and time.monotonic() < _deadline:
        time.sleep(0.02)


def handle(conn: Any) -> None:
    conn.sendall(b"%d\n" % os.getpid())
    while data := conn.recv(65536):
        conn.sendall(data)


async def handle_async(stream: Any) -> None:
    await stream.send_all(b"%d\n" % os.getpid())
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


def ignore_stop(conn: Any) -> None:
    """Answer 'busy', then work for a minute without looking at shutdown_requested().

    On threads the sleep cannot be interrupted (the task is left behind after the
    stop's grace); under weft serve's gevent patching it is a gevent sleep, which the
    stop's interruption kills.
    """
    conn.sendall(b"%d\nbusy\n" % os.getpid())
    time.sleep(60)


async def ignore_stop_trio(stream: Any) -> None:
    import trio

    await stream.send_all(b"%d\nbusy\n" % os.getpid())
    await trio.sleep(60)


async def ignore_stop_asyncio(stream: Any) -> None:
    import asyncio

    await stream.send_all(b"%d\nbusy\n" % os.getpid())
    await asyncio.sleep(60)


def spin(conn: Any) -> None:
    """Answer 'busy', then compute for a minute: a loop that never yields (any manager)."""
    conn.sendall(b"%d\nbusy\n" % os.getpid())
    until = time.monotonic() + 60
    while time.monotonic() < until:
        pass


async def block_loop(stream: Any) -> None:
    """Answer 'busy', then block the event loop for a minute (a blocking call in async)."""
    await stream.send_all(b"%d\nbusy\n" % os.getpid())
    time.sleep(60)
