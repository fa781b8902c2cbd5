"""Helpers for test_asyncio_app_edges.py: an application's own loop, and blocking clients.

The tests play an asyncio application (its own ``asyncio.Runner``, asyncio's loop or
uvloop's) that adds a weft server to its loop with ``Server(...).run()`` called from
a coroutine, as docs/managers.md ("Running in the application's loop") shows.
Clients are plain blocking sockets run in a thread (``asyncio.to_thread``), so that
nothing of the client shares the loop under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from weft_core import Server

T = TypeVar("T")

#: Upper bound for anything that should happen "at once".
WAIT = 5.0

LOOPS = [pytest.param("asyncio", id="asyncio"), pytest.param("uvloop", id="uvloop")]

#: own-<loop>: the manager's own loop thread; app-<loop>: Server.run() from a coroutine.
MODES = ["own-asyncio", "own-uvloop", "app-asyncio", "app-uvloop"]


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run_app(loop_name: str, main: Callable[[], Awaitable[T]], bound: float = 40.0) -> T:
    """Run ``main()`` as an application does (asyncio.run's way), bounded by ``bound``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), bound)  # type: ignore[arg-type]

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        return runner.run(bounded())


@contextlib.asynccontextmanager
async def serving(handler: Any, **kw: Any) -> AsyncIterator[Server]:
    """A weft server on the running (application's) loop, stopped at the end."""
    server = Server(handler, manager="asyncio", **kw)
    server.run()
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop, 2.0)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, as from a crashed client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Records(logging.Handler):
    """Keeps every record it is given; ``seen`` is set by the first."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen.set()


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (Linux TCP_INFO's first byte; 7 is CLOSE)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def until(predicate: Callable[[], bool], what: str, bound: float = WAIT) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def served(mode: str, handler: Any, **kw: Any) -> Iterator[Server]:
    """A running weft server in ``mode``; stopped (bounded) on leaving."""
    where, loop_name = mode.split("-")
    loop_factory(loop_name)  # skip early without uvloop
    if where == "own":
        server = Server(handler, manager="asyncio", manager_options={"loop": loop_name}, **kw)
        server.run()
        try:
            yield server
        finally:
            server.stop(timeout=2)
        return
    ready = threading.Event()
    leave: list[asyncio.Event] = []
    box: list[Any] = []

    async def main() -> None:
        server = Server(handler, manager="asyncio", **kw)
        server.run()
        done = asyncio.Event()
        leave.append(done)
        box.append((server, asyncio.get_running_loop()))
        ready.set()
        try:
            await asyncio.wait_for(done.wait(), 50)
        finally:
            await asyncio.to_thread(server.stop, 2.0)

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
                runner.run(main())
        except BaseException as exc:  # reported to the test
            box.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True, name="test-app-loop")
    thread.start()
    assert ready.wait(WAIT), "the application's loop did not start the server"
    if isinstance(box[-1], BaseException):
        raise box[-1]
    server, loop = box[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(leave[0].set)
        thread.join(10)
