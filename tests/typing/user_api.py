"""A user's script, typed: ``mypy --strict`` checks it against the public API (nox's types).

It is never run. It names what a user of every distribution writes: a handler of
each kind, a Server and what it reports (``server.port`` an int once bound), a
hook plugin, a conformance subclass. A public annotation that breaks a user's
strict typing fails here (the packaging check found ``port: int | str``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import Future

from typing_extensions import assert_type

import weft_core
from weft_asyncio import AsyncioStream
from weft_core import (
    BlockingRuntime,
    ConfigError,
    ConnectionInfo,
    ConnectionSnapshot,
    ManagerSpec,
    Server,
    TaskShutdown,
    UnknownManagerError,
    WeftError,
    available_managers,
    current_connection,
    current_task,
    hookimpl,
    shutdown_requested,
)
from weft_core.testing import ManagerTests
from weft_gevent import GeventSocket
from weft_pool import PoolManager
from weft_prometheus import ADDRESS_ENV, parse_address
from weft_threads import ThreadManager
from weft_trio import TrioManager


def echo(conn: socket.socket, greeting: bytes = b"") -> None:
    conn.sendall(greeting)
    info: ConnectionInfo = current_connection()
    print(info.peer)
    while not shutdown_requested():
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


async def echo_aio(stream: AsyncioStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()


def gecho(conn: GeventSocket) -> None:
    conn.sendall(conn.recv(10))


def main() -> int:
    server = Server(echo, args=(b"hi\n",), port=0, manager="threads", max_connections=10)
    server.run()
    port: int = server.port
    stopped: bool = server.stop(timeout=5)
    names: list[str] = sorted(available_managers())
    s2 = Server(echo_aio, manager="asyncio", bind="127.0.0.1:0")
    s3 = Server(echo, manager=ThreadManager())
    print(port, stopped, names, s2, s3, weft_core.__version__)
    print(ADDRESS_ENV, parse_address("127.0.0.1:9"))
    print(TrioManager, PoolManager, gecho)
    try:
        Server(echo, manager="nope")
    except (UnknownManagerError, ConfigError, WeftError) as exc:
        print(exc)
    return 0


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    yield ManagerSpec(name="mine", factory=ThreadManager, description="x")


class TestMine(ManagerTests):
    manager_name = "mine"


class Channel:
    """writing-a-manager.md's own object handed to handlers instead of the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class ChannelRuntime(BlockingRuntime):
    def wrap_connection(self, sock: socket.socket) -> Channel:  # as the docs show it
        return Channel(sock)


def count(n: int) -> int:
    return n


async def acount(n: int) -> int:
    return n


def typed_views(server: Server) -> None:
    """What a user reads back is typed: a Future of the function's result (an async
    def's awaited result), connections() items with their age, a task's callbacks."""
    assert_type(server.submit(count, 1), Future[int])
    assert_type(server.submit(acount, 1), Future[int])
    for item in server.connections():
        assert_type(item, ConnectionSnapshot)
        age: float = item.age
        info: ConnectionInfo = item
        print(age, info)
    task = current_task()
    if task is not None:
        task.on_shutdown(lambda: None)
    Server(echo, tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    Server(echo, tls={"certfile": "c.pem", "keyfile": "k.pem"})
    Server(echo, tls=False)
    Server(echo, tls="cert.pem")  # type: ignore[arg-type]  # refused at run time too


_ = TaskShutdown
