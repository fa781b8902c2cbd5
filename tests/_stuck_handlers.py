"""Handlers for ``weft serve`` that ignore every way a stop can reach them.

Each says ``+`` and then waits on something no manager can interrupt: a blocking
``os.read`` of a pipe nobody writes to (gevent's monkey-patching, which ``weft serve``
applies, leaves ``os.read`` alone, where it would turn a ``threading.Event`` into a
cooperative one). On threads that holds the thread; on an event loop (a gevent hub,
trio) it blocks the whole loop, the worst a handler can do to a stop.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_never, _kept_open = os.pipe()  # the write end stays open: the read never returns


def stuck(conn: Any) -> None:
    conn.sendall(b"+")
    os.read(_never, 1)


async def stuck_async(stream: Any) -> None:
    await stream.send_all(b"+")
    os.read(_never, 1)


#: The GIL's switch interval a spinning handler sets: the little CPU a loaded host
#: leaves the worker's other threads (the stack dump's relay waits this long per turn).
SPIN_SWITCH_INTERVAL = 0.4


def spinning(conn: Any) -> None:
    """Say ``+``, then spin in Python for ever, letting other threads run seldom."""
    conn.sendall(b"+")
    sys.setswitchinterval(SPIN_SWITCH_INTERVAL)
    while True:
        pass


async def spinning_async(stream: Any) -> None:
    await stream.send_all(b"+")
    sys.setswitchinterval(SPIN_SWITCH_INTERVAL)
    while True:
        pass


def runtime_sleep() -> Any:
    """The running loop's sleep: asyncio's inside asyncio's loop, else trio's."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio's loop: trio's
        import trio

        return trio.sleep
    return asyncio.sleep


async def swallowing_async(stream: Any) -> None:
    """Say ``+``, then sleep in a loop that swallows every cancellation (trio, asyncio):
    once cancelled, each sleep raises at once, and the loop spins through its runtime's
    scheduler, which polls for I/O with a zero timeout on every turn."""
    await stream.send_all(b"+")
    sleep = runtime_sleep()
    while True:
        try:
            await sleep(1000)
        except BaseException:  # the point: a handler that will not stop
            pass


def starts_a_thread(conn: Any) -> None:
    """Start a thread that is not a daemon (said so: a handler thread's own threads are
    daemons by default) and never ends, say ``+``, then serve until
    the client goes (or the stop ends the input): the handler ends, its thread does not."""
    import threading

    threading.Thread(target=os.read, args=(_never, 1), name="its own", daemon=False).start()
    conn.sendall(b"+")
    while conn.recv(1024):
        pass


async def awaits_to_thread(stream: Any) -> None:
    """asyncio: say ``+``, then await a call in the loop's executor that never returns
    (``asyncio.to_thread``, the way asyncio's docs give for a blocking call)."""
    import asyncio

    await stream.send_all(b"+")
    await asyncio.to_thread(os.read, _never, 1)


def starts_nothing(conn: Any) -> None:
    """Serve nothing: close at once (a server whose stop has nothing to wait for)."""


def stuck_on_go(conn: Any) -> None:
    """Echo one line, or, for ``go``, say ``+`` and wait for ever as :func:`stuck` does."""
    data = conn.recv(100)
    if data.strip() != b"go":
        conn.sendall(data)
        return
    conn.sendall(b"+")
    os.read(_never, 1)


async def stuck_on_go_async(stream: Any) -> None:
    data = bytes(await stream.receive_some(100))
    if data.strip() != b"go":
        await stream.send_all(data)
        return
    await stream.send_all(b"+")
    os.read(_never, 1)
