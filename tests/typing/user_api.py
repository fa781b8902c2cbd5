"""A user's script, typed: ``mypy --strict`` checks it against the public API (nox's types).

It is never run. It names what a user of every distribution writes: a handler of
each kind, a Server and what it reports (``server.port`` an int once bound), a
hook plugin, a conformance subclass. A public annotation that breaks a user's
strict typing fails here (the packaging check found ``port: int | str``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import weft_core
from weft_asyncio import AsyncioStream
from weft_core import (
    ConfigError,
    ConnectionInfo,
    ManagerSpec,
    Server,
    TaskShutdown,
    UnknownManagerError,
    WeftError,
    available_managers,
    current_connection,
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


_ = TaskShutdown
