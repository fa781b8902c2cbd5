"""Every manager weft ships, uvloop as one of its own, for tests that run on each.

``MANAGERS`` parametrizes ``("manager", "options")``; the ``serve`` fixture (import it into the test module)
runs a Server with the handler of the manager's kind, stopped after the test.
``tls_files`` is a ``tls`` table for the test certificates of ``_serving.server_certs``;
``echo`` and ``aecho`` the echo handler of each kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from weft_core import Server, available_managers
from weft_core._registry import get_manager_spec

#: (manager, manager_options) for every manager we ship, uvloop as a manager of its own.
_ALL = [
    ("threads", {}),
    ("gevent", {}),
    ("trio", {}),
    ("asyncio", {}),
    ("asyncio", {"loop": "uvloop"}),
]


def _available(name: str, options: dict[str, Any]) -> bool:
    if name not in available_managers():
        return False
    if options.get("loop") == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return False
    return True


MANAGERS = [
    pytest.param(name, options, id=name + ("-uvloop" if options else ""))
    for name, options in _ALL
    if _available(name, options)
]


def echo(conn: Any) -> None:
    """The plain echo handler (threads, gevent)."""
    while data := conn.recv(65536):
        conn.sendall(data)


async def aecho(stream: Any) -> None:
    """The same for the async managers (trio, asyncio)."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


def is_async(manager: str) -> bool:
    return get_manager_spec(manager).handler_kind == "async"


def greeter(manager: str) -> Callable[..., Any]:
    """A handler for ``manager`` that says ``+``, then reads until the client ends."""
    if is_async(manager):

        async def greet(stream: Any) -> None:
            await stream.send_all(b"+")
            while await stream.receive_some(100):
                pass

        return greet

    def greet_sync(conn: Any) -> None:
        conn.sendall(b"+")
        while conn.recv(100):
            pass

    return greet_sync


def tls_files(certs: dict[str, str]) -> dict[str, str]:
    return {"certfile": certs["cert"], "keyfile": certs["key"]}


@pytest.fixture
def serve(caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """``serve(manager, options, sync_handler, async_handler, **kw)``: a running Server."""
    caplog.set_level(logging.INFO)
    servers: list[Server] = []

    def make(manager: str, options: dict[str, Any], sync: Any, async_: Any, **kw: Any) -> Server:
        handler = async_ if is_async(manager) else sync
        server = Server(handler, manager=manager, manager_options=options, **kw)
        servers.append(server)
        server.run()
        return server

    yield make
    for server in servers:
        server.stop(timeout=1)
